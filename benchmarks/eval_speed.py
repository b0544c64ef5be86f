"""How long `qtrain eval` takes on all 164 HumanEval problems with the default model, greedy: transformers'
`generate` on static batches (the engine evaluation used before continuous batching) against qtrain's continuous
batching, in one run on the same machine, and whether the two engines wrote the same samples.

    python benchmarks/eval_speed.py [--work runs/eval-speed] [--limit N] [--batch-size 16]

Each engine runs the documented CLI (`qtrain eval --task humaneval --engine static|continuous`) in its own process,
one after the other, so nothing else shares the CPU. Writes benchmarks/results/eval_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import git_sha, write_results  # noqa: E402 - benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KEYS = ("generation_seconds", "generation_tokens", "generation_tokens_per_second", "forward_tokens", "pass@1")


def identical_samples(a: Path, b: Path) -> dict:
    """How many samples two eval directories share word for word, and which problems differ."""
    ra = {(r["task_id"], r["sample"]): r for r in map(json.loads, (a / "samples.jsonl").read_text().splitlines())}
    rb = [json.loads(x) for x in (b / "samples.jsonl").read_text().splitlines()]
    differ = [r["task_id"] for r in rb if ra[(r["task_id"], r["sample"])]["completion"] != r["completion"]]
    verdicts = sum(ra[(r["task_id"], r["sample"])]["passed"] != r["passed"] for r in rb)
    return {"samples": len(rb), "identical": len(rb) - len(differ), "differing_task_ids": differ,
            "verdicts_differing": verdicts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "runs" / "eval-speed"))
    ap.add_argument("--limit", type=int, help="smoke test: the first N problems")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from qtrain.measure import machine_info

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    engines, wall = {}, {}
    for engine in ("static", "continuous"):
        out = work / engine
        cmd = [sys.executable, "-m", "qtrain", "eval", "--task", "humaneval", "--engine", engine, "--batch-size",
               str(args.batch_size), "-o", str(out)] + (["--limit", str(args.limit)] if args.limit else [])
        print(f"[{engine}] {' '.join(cmd[2:])}", flush=True)
        start = time.perf_counter()
        with open(work / f"{engine}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wall[engine] = round(time.perf_counter() - start, 1)
        summary = json.loads((out / "summary.json").read_text())
        engines[engine] = {k: summary.get(k) for k in KEYS}
        print(f"[{engine}] {wall[engine]:.0f} s end to end", flush=True)
    git = git_sha()
    result = {"benchmark": "eval_speed", "machine": machine_info(), "git": git,
              "command": "python benchmarks/eval_speed.py" + (f" --limit {args.limit}" if args.limit else "")
                         + (f" --batch-size {args.batch_size}" if args.batch_size != 16 else ""),
              "problems": args.limit or 164, "batch_size": args.batch_size, "engines": engines,
              "end_to_end_seconds": wall,
              "speedup_generation": round(engines["static"]["generation_seconds"]
                                          / engines["continuous"]["generation_seconds"], 2),
              "speedup_end_to_end": round(wall["static"] / wall["continuous"], 2),
              "samples": identical_samples(work / "static", work / "continuous")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results("eval_speed", result, render(result))
    print(render(result))


def render(r: dict) -> str:
    m, e, w, s = r["machine"], r["engines"], r["end_to_end_seconds"], r["samples"]
    lines = ["# Evaluation speed: HumanEval, default model, greedy", "",
             f"Machine: {m.get('cpu')} ({m.get('cores')} cores), torch {m.get('torch')}; git {r['git']}. "
             f"Reproduce: `{r['command']}`. {r['problems']} problems, batch {r['batch_size']}, both engines in one "
             "run, one after the other.", "",
             "| engine | end to end (s) | generation (s) | new tokens | tokens/s | positions computed | pass@1 |",
             "|---|---|---|---|---|---|---|"]
    for name in ("static", "continuous"):
        x = e[name]
        lines.append(f"| {name} | {w[name]:.0f} | {x['generation_seconds']:.0f} | {x['generation_tokens']} | "
                     f"{x['generation_tokens_per_second']:.1f} | {x.get('forward_tokens') or '-'} | "
                     f"{x['pass@1']:.2%} |")
    lines += ["", f"Continuous batching: {r['speedup_generation']}x faster generation, {r['speedup_end_to_end']}x end to "
              f"end. Samples: {s['identical']}/{s['samples']} identical"
              + (f" (differing: {', '.join(s['differing_task_ids'])}; {s['verdicts_differing']} verdicts differ)"
                 if s["differing_task_ids"] else "") + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
