"""The same model-written samples scored by the sandbox at an earlier revision and by the current one: which
verdicts changed, and why (each side's reason), so that a change in the scoring is a listed decision, not drift.

    python benchmarks/sandbox_verdicts.py runs/eval-speed/continuous [--task humaneval] [--baseline-rev c0776e3]

The first argument is a `qtrain eval` output directory (its samples.jsonl is re-scored, nothing is generated).
The baseline scores in a git worktree of ``--baseline-rev``; both run the documented CLI (`qtrain eval
--samples`) in their own process, one after the other. Writes benchmarks/results/sandbox_verdicts.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import header, write_results  # noqa: E402 - benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def score(code_root: Path, samples: Path, task: str, chat: bool, out: Path) -> tuple[dict, float]:
    """(task_id, sample) -> scored record, as ``code_root``'s qtrain scores ``samples``; and the wall time."""
    cmd = [sys.executable, "-m", "qtrain", "eval", "--task", task, "--samples", str(samples), "-o", str(out),
           "--chat" if chat else "--no-chat"]
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=code_root, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    return {(r["task_id"], r.get("sample", 0)): r for r in rows}, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("eval_dir", help="a qtrain eval output directory whose samples.jsonl is re-scored")
    ap.add_argument("--task", default="humaneval")
    ap.add_argument("--baseline-rev", default="c0776e3", help="the revision whose sandbox is the baseline")
    args = ap.parse_args()
    samples = Path(args.eval_dir).resolve() / "samples.jsonl"
    # Said on both command lines: a baseline that predates reading the prompting from the eval directory would
    # otherwise score chat answers as completions, and every sample would fail on both sides.
    chat = json.loads((samples.parent / "summary.json").read_text()).get("prompting") == "chat"
    work = Path(tempfile.mkdtemp(prefix="qtrain-verdicts-"))
    base_tree = work / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree), args.baseline_rev],
                   check=True, capture_output=True)
    try:
        old, old_s = score(base_tree, samples, args.task, chat, work / "old")
        new, new_s = score(ROOT, samples, args.task, chat, work / "new")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], capture_output=True)
    changed = [{"task_id": k[0], "sample": k[1], "baseline": old[k]["passed"], "current": new[k]["passed"],
                "baseline_reason": old[k].get("reason"), "current_reason": new[k].get("reason")}
               for k in sorted(new) if k in old and old[k]["passed"] != new[k]["passed"]]
    result = header("sandbox_verdicts", task=args.task, baseline_rev=args.baseline_rev,
                    command=f"python benchmarks/sandbox_verdicts.py EVAL_DIR --task {args.task} "
                            f"--baseline-rev {args.baseline_rev}",
                    prompting="chat" if chat else "completion", samples=len(new),
                    passed={"baseline": sum(r["passed"] for r in old.values()),
                            "current": sum(r["passed"] for r in new.values())},
                    seconds={"baseline": round(old_s, 1), "current": round(new_s, 1)},
                    statement_checks=sum(r.get("statement_checks", 0) for r in new.values()), changed=changed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results("sandbox_verdicts", result, render(result))
    print(render(result))


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Verdicts on the same {r['task']} samples: sandbox at {r['baseline_rev']} against the current one", "",
             f"Machine: {m.get('cpu')} ({m.get('cores')} cores); git {r['git']}. `{r['command']}`", "",
             "| | baseline | current |", "|---|---|---|",
             f"| samples passed (of {r['samples']}, {r['prompting']} prompting) | {r['passed']['baseline']} | {r['passed']['current']} |",
             f"| scoring wall time | {r['seconds']['baseline']} s | {r['seconds']['current']} s |", "",
             f"Checks the current sandbox ran as statements (not value-compared): {r['statement_checks']}.", ""]
    if r["changed"]:
        lines += ["Verdicts that changed:", "", "| task | sample | baseline | current | baseline reason | current reason |",
                  "|---|---|---|---|---|---|"]
        for c in r["changed"]:
            lines.append(f"| {c['task_id']} | {c['sample']} | {c['baseline']} | {c['current']} | "
                         f"{(c['baseline_reason'] or '')[:80]} | {(c['current_reason'] or '')[:80]} |")
    else:
        lines.append("Every verdict is the same.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
