"""The embedded default model on HumanEval (all 164, greedy) and MBPP (test split), plus the sandbox's cost and
the hostile-program outcome table. Writes benchmarks/results/eval_default.{json,md}.

    python benchmarks/eval_default.py [--mbpp ../shared/data/mbpp.jsonl] [--mbpp-limit N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import git_sha  # noqa: E402 - benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))


def sandbox_overhead(n: int = 20) -> dict:
    """Median wall time of a trivial program in the sandbox vs the same interpreter started plainly."""
    from qtrain.sandbox import Limits, run_program, sandbox_mode

    plain, boxed = [], []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-c", "x = 1\nassert x == 1"], check=True)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = run_program("x = 1", ["assert x == 1"], Limits())
        boxed.append(time.perf_counter() - t)
        assert r.passed, r.reason
    return {"mode": sandbox_mode(), "runs": n, "median_plain_seconds": round(statistics.median(plain), 4),
            "median_sandbox_seconds": round(statistics.median(boxed), 4),
            "median_overhead_seconds": round(statistics.median(boxed) - statistics.median(plain), 4)}


def hostile_table() -> list[dict]:
    from test_sandbox import CHECKS, HOSTILE, LIMITS

    from qtrain.sandbox import run_program

    rows = []
    for name, (program, _) in HOSTILE.items():
        t = time.perf_counter()
        r = run_program(program, CHECKS, LIMITS)
        rows.append({"program": name, "passed": r.passed, "status": r.status, "reason": r.reason[:120],
                     "seconds": round(time.perf_counter() - t, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mbpp", help="original mbpp.jsonl (test split, task ids 11-510)")
    ap.add_argument("--mbpp-limit", type=int)
    ap.add_argument("--humaneval-limit", type=int)
    ap.add_argument("--add-mbpp", action="store_true",
                    help="only run MBPP and add it to the existing results (HumanEval and the sandbox figures kept)")
    args = ap.parse_args()

    from qtrain.evaluate import EvalOptions, run_eval
    from qtrain.io import atomic_write_json, atomic_write_text
    from qtrain.measure import machine_info

    import json

    work = Path(tempfile.mkdtemp(prefix="qtrain-eval-bench-"))
    git = git_sha()
    if args.add_mbpp:
        result = json.loads((RESULTS / "eval_default.json").read_text())
    else:
        result = {"benchmark": "eval_default", "machine": machine_info(), "git": git}
        t = time.perf_counter()
        he = run_eval(None, EvalOptions(task="humaneval", limit=args.humaneval_limit), work / "humaneval")
        result["humaneval"] = {**he, "end_to_end_seconds": round(time.perf_counter() - t, 1),
                               "command": "python benchmarks/eval_default.py"}
    if args.mbpp:
        t = time.perf_counter()
        mb = run_eval(None, EvalOptions(task="mbpp", data=args.mbpp, limit=args.mbpp_limit), work / "mbpp")
        result["mbpp"] = {**mb, "end_to_end_seconds": round(time.perf_counter() - t, 1), "git": git,
                          "command": "python benchmarks/eval_default.py --add-mbpp --mbpp MBPP.jsonl"
                                     + (f" --mbpp-limit {args.mbpp_limit}" if args.mbpp_limit else "")}
    if not args.add_mbpp:
        result["sandbox_overhead"] = sandbox_overhead()
        result["hostile"] = hostile_table()
    cmd = " ; ".join(result[k]["command"] for k in ("humaneval", "mbpp") if k in result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "eval_default.json", result)
    m = result["machine"]
    lines = ["# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32) on code benchmarks",
             "", f"Machine: {m.get('cpu')} ({m.get('cores')} cores), torch {m.get('torch')}; git {result['git']}. "
             f"Reproduce: `{cmd}`.", "",
             "| task | problems | prompting | pass@1 | test-case accuracy | BLEU | generation tok/s | end to end (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for key in ("humaneval", "mbpp"):
        if key in result:
            s = result[key]
            lines.append(f"| {key} | {s['problems']} | {s['prompting']} (greedy, max {s['max_new_tokens']} new tokens, "
                         f"batch {s['batch_size']}) | {s['pass@1']:.2%} | {s['test_case_accuracy']:.2%} | {s['bleu']} | "
                         f"{s['generation_tokens_per_second']:.1f} | {s['end_to_end_seconds']:.0f} |")
    o = result["sandbox_overhead"]
    lines += ["", "Prompts: instruct models get the chat template with \"Complete the following Python function. Reply "
              "with the whole function in one ```python code block.\" + the HumanEval prompt in a fence (MBPP: the "
              "standard \"You are an expert Python programmer...\" instruction with its three tests); the code is taken "
              "from the first fenced block.", "",
              f"Sandbox ({o['mode']}): a trivial program takes {o['median_sandbox_seconds'] * 1000:.0f} ms median in the "
              f"sandbox vs {o['median_plain_seconds'] * 1000:.0f} ms started plainly: "
              f"{o['median_overhead_seconds'] * 1000:.0f} ms overhead per program ({o['runs']} runs each).", "",
              "| hostile program | outcome | reason | seconds |", "|---|---|---|---|"]
    for r in result["hostile"]:
        lines.append(f"| {r['program']} | {'PASSED (bad)' if r['passed'] else r['status']} | "
                     f"{r['reason'].replace('|', '/')} | {r['seconds']} |")
    atomic_write_text(RESULTS / "eval_default.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
