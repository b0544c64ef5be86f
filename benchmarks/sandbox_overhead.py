"""What the sandbox costs per program: the current qtrain/sandbox.py against the one at an earlier revision, run
interleaved (old, new, old, new, ...) in one process on the same trivial program, so machine noise hits both.

    python benchmarks/sandbox_overhead.py [--baseline-rev 3cb2ea7] [-n 40]

Writes benchmarks/results/sandbox_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import header, write_results  # noqa: E402 - benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROGRAM = "def add(a, b):\n    return a + b\n"
CHECKS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def load_revision(rev: str):
    """qtrain/sandbox.py as it was at ``rev``, imported under another name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:qtrain/sandbox.py"], capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="qtrain-sandbox-rev-")) / "sandbox_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sandbox_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the class is built
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-rev", default="3cb2ea7", help="the revision whose sandbox is the baseline")
    ap.add_argument("-n", type=int, default=40, help="programs per implementation")
    args = ap.parse_args()

    from qtrain import sandbox

    old = load_revision(args.baseline_rev)
    mode = sandbox.sandbox_mode()
    old_mode = old.sandbox_mode()
    times: dict[str, list[float]] = {"baseline": [], "current": []}
    for _ in range(3):  # warm the page cache for both
        old.run_program(PROGRAM, CHECKS)
        sandbox.run_program(PROGRAM, CHECKS)
    for _ in range(args.n):
        for name, impl in (("baseline", old), ("current", sandbox)):
            r = impl.run_program(PROGRAM, CHECKS)
            assert r.passed, f"{name}: {r.reason}"
            times[name].append(r.seconds)
    stats = {k: {"median_ms": round(statistics.median(v) * 1e3, 1), "p90_ms": round(sorted(v)[int(0.9 * len(v))] * 1e3, 1),
                 "programs": len(v)} for k, v in times.items()}
    result = header("sandbox_overhead", baseline_rev=args.baseline_rev, mode={"baseline": old_mode, "current": mode}, uid=__import__("os").getuid(), command=f"python benchmarks/sandbox_overhead.py --baseline-rev {args.baseline_rev} -n {args.n}", per_program=stats, ratio_median=round(stats["current"]["median_ms"] / stats["baseline"]["median_ms"], 2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results("sandbox_overhead", result, render(result))
    print(render(result))


def render(r: dict) -> str:
    m, s = r["machine"], r["per_program"]
    lines = ["# Sandbox overhead per program", "",
             f"Machine: {m.get('cpu')} ({m.get('cores')} cores); git {r['git']}, running as uid {r['uid']}. "
             f"Reproduce: `{r['command']}`. A two-line function and two asserts, start to verdict, the two "
             "implementations interleaved.", "",
             "| sandbox | mode | median (ms) | p90 (ms) | programs |", "|---|---|---|---|---|"]
    for name, label in (("baseline", f"before ({r['baseline_rev']})"), ("current", "now")):
        lines.append(f"| {label} | {r['mode'][name]} | {s[name]['median_ms']} | {s[name]['p90_ms']} | "
                     f"{s[name]['programs']} |")
    lines += ["", f"Now / before (median): {r['ratio_median']}x."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
