"""Throughput and peak memory of `qtrain fit` on glibc's allocator vs jemalloc, side by side on this CPU.

`qtrain fit` re-executes itself with the system jemalloc when there is one (qtrain.measure.jemalloc_exec_env);
this measures what that costs and saves. Each variant runs as the user would run it (`python -m qtrain fit`,
QTRAIN_ALLOCATOR=glibc or jemalloc), alternating the two allocators round by round so that a slow spell of a
shared machine lands on both. Writes benchmarks/results/allocator_speed.{json,md}.

    python benchmarks/allocator_speed.py [--rounds 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import header, git_sha  # noqa: E402 - benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {  # name -> recipe overrides (default model, default corpus)
    "lora, checkpointing, 4x256": ["method=lora", "gradient_checkpointing=true", "seq_len=256", "micro_batch_size=4"],
    "full, 4x256": ["method=full", "gradient_checkpointing=false", "seq_len=256", "micro_batch_size=4"],
}


def run(overrides: list[str], allocator: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        proc = subprocess.run([sys.executable, "-m", "qtrain", "fit", "-o", str(out), *overrides, "grad_accum_steps=1",
                               f"max_steps={steps}", "save_every=0", "warmup_steps=1", "val_max_sequences=2"],
                              env={**os.environ, "QTRAIN_ALLOCATOR": allocator}, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr[-1500:]}
        s = json.loads((out / "summary.json").read_text())
    return {k: s[k] for k in ("allocator", "tokens_per_second", "peak_memory_bytes", "train_seconds")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    from qtrain.io import atomic_write_json, atomic_write_text
    from qtrain.measure import find_jemalloc

    if find_jemalloc() is None:
        raise SystemExit("no libjemalloc.so.2 on this system (apt install libjemalloc2): nothing to compare")
    runs: dict[str, dict[str, list[dict]]] = {v: {"glibc": [], "jemalloc": []} for v in VARIANTS}
    for i in range(args.rounds):
        order = ("glibc", "jemalloc") if i % 2 == 0 else ("jemalloc", "glibc")
        for name, overrides in VARIANTS.items():
            for alloc in order:
                r = run(overrides, alloc, args.steps)
                runs[name][alloc].append(r)
                said = "FAILED " + r["error"][-300:] if "error" in r else f"{r['tokens_per_second']:.1f} tok/s"
                print(f"{name} [{alloc}]: {said}", file=sys.stderr)
    rows = []
    for name, by in runs.items():
        ok = {a: [r for r in rs if "error" not in r] for a, rs in by.items()}
        if not all(ok.values()):
            rows.append({"variant": name, "error": "a run failed", "runs": by})
            continue
        assert all(r["allocator"] == a for a, rs in ok.items() for r in rs), "the allocator asked for was not the one used"
        med = {a: {"tokens_per_second": statistics.median(r["tokens_per_second"] for r in rs),
                   "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in rs)} for a, rs in ok.items()}
        rows.append({"variant": name, "runs": by, "median": med,
                     "speed_ratio": med["jemalloc"]["tokens_per_second"] / med["glibc"]["tokens_per_second"],
                     "memory_ratio": med["jemalloc"]["peak_memory_bytes"] / med["glibc"]["peak_memory_bytes"]})
    git = git_sha()
    command = "python benchmarks/allocator_speed.py" + (f" --rounds {args.rounds}" if args.rounds != 2 else "") + (
        f" --steps {args.steps}" if args.steps != 4 else "")
    result = header("allocator_speed", command=command, rows=rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "allocator_speed.json", result)
    m = result["machine"]
    lines = ["# `qtrain fit` on glibc's allocator vs jemalloc (default model, this CPU)", "",
             f"Machine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}; git {git}. Reproduce: `{command}`. "
             f"{args.rounds} runs per allocator, alternating; medians; {args.steps} optimizer steps per run.", "",
             "| variant | tokens/s glibc | tokens/s jemalloc | speed ratio | peak glibc (GiB) | peak jemalloc (GiB) | "
             "memory ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed | | | | | |")
            continue
        g, j = r["median"]["glibc"], r["median"]["jemalloc"]
        lines.append(f"| {r['variant']} | {g['tokens_per_second']:.1f} | {j['tokens_per_second']:.1f} | "
                     f"{r['speed_ratio']:.2f} | {g['peak_memory_bytes'] / 2**30:.2f} | "
                     f"{j['peak_memory_bytes'] / 2**30:.2f} | {r['memory_ratio']:.2f} |")
    atomic_write_text(RESULTS / "allocator_speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
