"""``qtrain rejection-sample``: instruction data a model earns by passing unit tests (execution-filtered self-training).

Code Llama (Roziere et al. 2023, sec. 2.5) built its self-instruct data this way: sample solutions, run them against
unit tests, keep those that pass. Here, for any problem set with tests: sample ``k`` answers per problem (chat
prompting, the same prompt ``qtrain eval`` uses), run each in the sandbox (qtrain/sandbox.py), keep up to
``keep_per_problem`` distinct passing solutions, optionally add the dataset's own reference solutions (also run:
a few MBPP references fail on current Python), and write chat SFT JSONL that ``qtrain fit --data`` reads.

MBPP's test split (task ids 11-510) and HumanEval are for evaluation; they are refused as training problems.
"""

from __future__ import annotations

import ast
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from qtrain.errors import QtrainError
from qtrain.evaluate import MBPP_TEST_IDS, Problem, extract_code, load_mbpp, read_jsonl
from qtrain.io import atomic_write_json, atomic_write_text

MBPP_TRAIN_IDS = range(511, 975)  # validation 511-600 and train 601-974 (Austin et al. 2021)


class SelfTrainError(QtrainError, ValueError):
    pass


@dataclass
class SampleOptions:
    problems: str
    output: str
    samples_per_problem: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    keep_per_problem: int = 2
    add_references: bool = True
    max_new_tokens: int = 384
    batch_size: int = 16
    seed: int = 0
    timeout_s: float = 10.0
    workers: int | None = None
    limit: int | None = None
    previous: str | None = None
    unsafe_no_sandbox: bool = False

    def __post_init__(self) -> None:
        import math

        for key in ("samples_per_problem", "keep_per_problem", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise SelfTrainError(f"--{key.replace('_', '-')} {getattr(self, key)} must be at least 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise SelfTrainError(f"--temperature {self.temperature} must be a positive number: rejection sampling "
                                 "needs varied samples (0.8 is usual)")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise SelfTrainError(f"--top-p {self.top_p} must be in (0, 1]")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise SelfTrainError(f"--timeout {self.timeout_s} must be a positive number of seconds")
        if self.limit is not None and self.limit < 1:
            raise SelfTrainError(f"--limit {self.limit} must be positive")


# ------------------------------------------------------------------------------------------------ problems

def load_problems(path: str, limit: int | None = None) -> list[Problem]:
    """Training problems: MBPP's original JSONL (task ids 511-974 only), or JSONL of
    ``{"task_id", "prompt", "tests": [assert ...], "setup"?, "reference"?}``."""
    rows = read_jsonl(path, "problem file", "give MBPP's original mbpp.jsonl or JSONL with task_id, prompt, tests")
    if not rows:
        raise SelfTrainError(f"problem file {path!r} is empty")
    first = rows[0][1]
    if isinstance(first, dict) and {"text", "code", "test_list"} <= set(first):
        problems = [p for p in load_mbpp(path, all_problems=True)
                    if int(p.task_id.split("/")[1]) in MBPP_TRAIN_IDS]
        if not problems:
            raise SelfTrainError(f"{path!r} has no MBPP problems with task ids 511-974 (the validation and train "
                                 "splits); the test split 11-510 is never used for training")
    else:
        problems = [_user_problem(path, n, row) for n, row in rows]
    for p in problems:
        if p.task_id.startswith("HumanEval/") or (p.task_id.startswith("MBPP/")
                                                  and int(p.task_id.split("/")[1]) in MBPP_TEST_IDS):
            raise SelfTrainError(f"problem {p.task_id} is from an evaluation set (HumanEval or MBPP's test split "
                                 "11-510); training on it would make its scores meaningless")
    return problems[:limit] if limit else problems


def _user_problem(path: str, n: int, row) -> Problem:
    if not isinstance(row, dict):
        raise SelfTrainError(f"{path}:{n} is not a JSON object")
    tid, prompt, tests = row.get("task_id"), row.get("prompt"), row.get("tests")
    if not isinstance(tid, str) or not isinstance(prompt, str) or not prompt.strip():
        raise SelfTrainError(f"{path}:{n} needs a string 'task_id' and a non-empty string 'prompt'")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise SelfTrainError(f"{path}:{n} needs 'tests': a non-empty list of assert statements (strings)")
    setup, ref = row.get("setup", ""), row.get("reference", "")
    if not isinstance(setup, str) or not isinstance(ref, str):
        raise SelfTrainError(f"{path}:{n}: 'setup' and 'reference' must be strings when given")
    return Problem(tid, "", prompt, None, setup, tests, ref)


# ------------------------------------------------------------------------------------------------ solutions

def clean_solution(code: str) -> str:
    """The solution without the example calls, prints, asserts and ``if __name__ == "__main__"`` blocks models
    add after it: a training answer should be the function, not a demo of it. Unparsable code is returned as is
    (it will fail in the sandbox)."""
    code = code.replace("\r\n", "\n").strip("\n")
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    lines = code.split("\n")
    drop: list[tuple[int, int]] = []
    for node in tree.body:
        main_guard = (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                      and "__name__" in ast.unparse(node.test))
        if isinstance(node, (ast.Expr, ast.Assert)) and not isinstance(getattr(node, "value", None), ast.Constant) \
                or main_guard:
            drop.append((node.lineno - 1, node.end_lineno))
    for start, end in reversed(drop):
        del lines[start:end]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def normal_form(code: str) -> str:
    """Formatting- and comment-blind key for de-duplicating solutions."""
    try:
        return ast.unparse(ast.parse(code))
    except SyntaxError:
        return re.sub(r"\s+", " ", code).strip()


def answer_text(code: str) -> str:
    """How an assistant answer looks in the SFT data: one fenced block, the shape eval extracts."""
    return f"```python\n{code}\n```"


def sft_record(problem: Problem, code: str, origin: str, round_: int) -> dict:
    return {"messages": [{"role": "user", "content": problem.instruction},
                         {"role": "assistant", "content": answer_text(code)}],
            "task_id": problem.task_id, "origin": origin, "round": round_}


# ------------------------------------------------------------------------------------------------ the command

def _read_previous(path: str) -> tuple[list[dict], list[dict]]:
    """Records and per-round reports of an earlier round's output."""
    records = [row for _, row in read_jsonl(path, "previous round", "give the JSONL an earlier run wrote")]
    if not all(isinstance(r, dict) and "messages" in r and "task_id" in r for r in records):
        raise SelfTrainError(f"{path!r} is not the output of qtrain rejection-sample (records need messages, task_id)")
    report = Path(path).with_suffix(".report.json")
    rounds = json.loads(report.read_text())["rounds"] if report.is_file() else []
    return records, rounds


def run_rejection_sampling(model_ref, opts: SampleOptions, say=print) -> dict:
    """Sample, run, keep; writes ``opts.output`` (JSONL) and its ``.report.json``; returns the report."""
    from qtrain.evaluate import generate_texts, render_prompt
    from qtrain.infer import load_for_inference
    from qtrain.sandbox import Limits, run_many, sandbox_mode

    problems = load_problems(opts.problems, opts.limit)
    mode = sandbox_mode(opts.unsafe_no_sandbox)  # before sampling: no sandbox, no run (unless accepted)
    previous, rounds = _read_previous(opts.previous) if opts.previous else ([], [])
    round_ = 1 + max([r.get("round", 0) for r in previous] + [0])
    say(f"loading {model_ref or 'the embedded default model'} ...")
    loaded = load_for_inference(model_ref)
    if not loaded.is_chat:
        raise SelfTrainError(f"{loaded.name} has no chat template; rejection sampling writes chat SFT data and needs "
                             "an instruct model")
    k = opts.samples_per_problem
    prompts = [render_prompt(loaded, p, True) for p in problems]
    jobs = [(pi, s) for pi in range(len(problems)) for s in range(k)]
    say(f"round {round_}: sampling {k} answers for each of {len(problems)} problems (temperature {opts.temperature})")
    gen = generate_texts(loaded, [prompts[pi] for pi, _ in jobs], max_new_tokens=opts.max_new_tokens,
                         temperature=opts.temperature, top_p=opts.top_p, stops=[], chat=True,
                         batch_size=opts.batch_size, seed=opts.seed + 1000 * round_)
    codes = [clean_solution(extract_code(text)) for text, _ in gen.texts]
    refs = [(pi, clean_solution(p.reference)) for pi, p in enumerate(problems)
            if opts.add_references and p.reference.strip()]
    programs = [(problems[pi].task_id, code) for (pi, _), code in zip(jobs, codes)] + \
               [(problems[pi].task_id, code) for pi, code in refs]
    say(f"running {len(programs)} programs in the sandbox ({mode}) ...")
    start = time.perf_counter()
    by_id = {p.task_id: p for p in problems}
    results = run_many([(code, by_id[t].setup, by_id[t].checks) for t, code in programs],
                       Limits(timeout_s=opts.timeout_s, cpu_s=max(1, int(opts.timeout_s + 0.999))),
                       workers=opts.workers, mode=mode)
    sandbox_s = time.perf_counter() - start
    sample_results, ref_results = results[:len(jobs)], results[len(jobs):]

    kept: dict[str, list[dict]] = {}
    seen: dict[str, set[str]] = {}
    for rec in previous:  # earlier rounds first: their answers count against keep_per_problem
        seen.setdefault(rec["task_id"], set()).add(normal_form(extract_code(rec["messages"][-1]["content"])))
        kept.setdefault(rec["task_id"], []).append(rec)
    solved: set[str] = set()
    new_samples = 0
    for (pi, _), code, r in zip(jobs, codes, sample_results):
        p = problems[pi]
        if not r.passed:
            continue
        solved.add(p.task_id)
        key = normal_form(code)
        samples_kept = sum(x["origin"] == "sample" for x in kept.get(p.task_id, []))
        if key in seen.setdefault(p.task_id, set()) or samples_kept >= opts.keep_per_problem:
            continue
        seen[p.task_id].add(key)
        kept.setdefault(p.task_id, []).append(sft_record(p, code, "sample", round_))
        new_samples += 1
    refs_ok = 0
    for (pi, code), r in zip(refs, ref_results):
        p = problems[pi]
        if not r.passed:
            continue
        refs_ok += 1
        key = normal_form(code)
        if key not in seen.setdefault(p.task_id, set()) and not any(
                x["origin"] == "reference" for x in kept.get(p.task_id, [])):
            seen[p.task_id].add(key)
            kept.setdefault(p.task_id, []).append(sft_record(p, code, "reference", round_))

    records = [r for p in problems for r in kept.get(p.task_id, [])]
    records += [r for t, rs in kept.items() if t not in by_id for r in rs]  # previous rounds' other problems
    passed_samples = sum(r.passed for r in sample_results)
    this_round = {"round": round_, "model": loaded.name, "problems": len(problems), "samples": len(jobs),
                  "samples_passed": passed_samples, "sample_pass_rate": round(passed_samples / max(1, len(jobs)), 4),
                  "problems_solved": len(solved), "solve_rate": round(len(solved) / max(1, len(problems)), 4),
                  "samples_kept": new_samples, "references_run": len(refs), "references_passed": refs_ok,
                  "generation_seconds": gen.stats["generation_seconds"],
                  "generation_tokens_per_second": gen.stats["generation_tokens_per_second"],
                  "sandbox_seconds": round(sandbox_s, 1), "sandbox_mode": mode}
    report = {"problems_file": str(opts.problems), "output": str(opts.output),
              "options": {k_: v for k_, v in vars(opts).items()}, "records": len(records),
              "records_by_origin": {o: sum(r["origin"] == o for r in records) for o in ("sample", "reference")},
              "rounds": rounds + [this_round]}
    out = Path(opts.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_json(out.with_suffix(".report.json"), report)
    return report
