"""Throughput and peak memory of `qtrain fit` on glibc's allocator vs jemalloc, side by side on this CPU.

`qtrain fit` re-executes itself with the system jemalloc when there is one (qtrain.measure.jemalloc_exec_env);
this measures what that costs and saves, and what its one-arena setting (qtrain.measure.JEMALLOC_CONF) costs
and saves against jemalloc's default of arenas per thread. Each variant runs as the user would run it
(`python -m qtrain fit`, QTRAIN_ALLOCATOR=glibc or jemalloc), the settings in rotated order round by round so
that a slow spell of a shared machine lands on all. Writes benchmarks/results/allocator_speed.{json,md}.

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


# name -> environment of `qtrain fit`. jemalloc's own default gives each thread one of 4 x cores arenas; a user's
# MALLOC_CONF comes after qtrain's one-arena setting (qtrain.measure.JEMALLOC_CONF) and wins.
SETTINGS = {
    "glibc": {"QTRAIN_ALLOCATOR": "glibc"},
    "jemalloc, one arena (qtrain)": {"QTRAIN_ALLOCATOR": "jemalloc"},
    "jemalloc, arenas per thread": {"QTRAIN_ALLOCATOR": "jemalloc", "MALLOC_CONF": f"narenas:{4 * (os.cpu_count() or 1)}"},
}


def run(overrides: list[str], env: dict, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        proc = subprocess.run([sys.executable, "-m", "qtrain", "fit", "-o", str(out), *overrides, "grad_accum_steps=1",
                               f"max_steps={steps}", "save_every=0", "warmup_steps=1", "val_max_sequences=2"],
                              env={**os.environ, **env}, capture_output=True, text=True)
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
    names = list(SETTINGS)
    runs: dict[str, dict[str, list[dict]]] = {v: {a: [] for a in names} for v in VARIANTS}
    for i in range(args.rounds):
        order = names[i % len(names):] + names[: i % len(names)]  # rotated, so no setting always runs first
        for name, overrides in VARIANTS.items():
            for alloc in order:
                r = run(overrides, SETTINGS[alloc], args.steps)
                runs[name][alloc].append(r)
                said = "FAILED " + r["error"][-300:] if "error" in r else f"{r['tokens_per_second']:.1f} tok/s"
                print(f"{name} [{alloc}]: {said}", file=sys.stderr)
    rows = []
    for name, by in runs.items():
        ok = {a: [r for r in rs if "error" not in r] for a, rs in by.items()}
        if not all(ok.values()):
            rows.append({"variant": name, "error": "a run failed", "runs": by})
            continue
        want = {a: SETTINGS[a]["QTRAIN_ALLOCATOR"] for a in names}
        assert all(r["allocator"] == want[a] for a, rs in ok.items() for r in rs), "the allocator asked for was not used"
        med = {a: {"tokens_per_second": statistics.median(r["tokens_per_second"] for r in rs),
                   "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in rs)} for a, rs in ok.items()}
        rows.append({"variant": name, "runs": by, "median": med})
    git = git_sha()
    command = "python benchmarks/allocator_speed.py" + (f" --rounds {args.rounds}" if args.rounds != 2 else "") + (
        f" --steps {args.steps}" if args.steps != 4 else "")
    result = header("allocator_speed", command=command, settings=SETTINGS, rows=rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "allocator_speed.json", result)
    m = result["machine"]
    lines = ["# `qtrain fit` on glibc's allocator vs jemalloc (default model, this CPU)", "",
             f"Machine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}; git {git}. Reproduce: `{command}`. "
             f"{args.rounds} runs per setting, in rotated order; medians; {args.steps} optimizer steps per run. "
             "Ratios are against glibc.", "",
             "| variant | allocator | tokens/s | speed ratio | peak (GiB) | memory ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed | | | | |")
            continue
        base = r["median"]["glibc"]
        for a, v in r["median"].items():
            lines.append(f"| {r['variant']} | {a} | {v['tokens_per_second']:.1f} | "
                         f"{v['tokens_per_second'] / base['tokens_per_second']:.2f} | "
                         f"{v['peak_memory_bytes'] / 2**30:.2f} | {v['peak_memory_bytes'] / base['peak_memory_bytes']:.2f} |")
    atomic_write_text(RESULTS / "allocator_speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
