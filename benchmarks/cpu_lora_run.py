"""A full run of recipes/cpu-lora.yaml (about 20 minutes on a 2-core CPU): does validation perplexity drop?

Runs the real CLI on the embedded default model and the default corpus (Python standard library,
held-out files by content hash), then writes benchmarks/results/cpu_lora_run.{json,md} with the
before/after perplexity, throughput, peak memory and the loss curve.

    python benchmarks/cpu_lora_run.py [--recipe recipes/cpu-lora.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import git_sha  # noqa: E402 - benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/cpu-lora.yaml")
    ap.add_argument("--name", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    name = args.name or Path(args.recipe).stem + "_run"
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        cmd = [sys.executable, "-m", "qtrain", "fit", "--recipe", args.recipe, "-o", str(out), *args.overrides]
        subprocess.run(cmd, check=True, cwd=ROOT)
        summary = json.loads((out / "summary.json").read_text())
        curve = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    git = git_sha()
    command = " ".join(["python", "benchmarks/cpu_lora_run.py", "--recipe", args.recipe, *args.overrides])
    result = {"benchmark": name, "git": git, "command": command, "summary": summary,
              "loss_curve": [{"step": c["step"], "loss": c["loss"]} for c in curve if "loss" in c]}
    from qtrain.io import atomic_write_json, atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"{name}.json", result)
    s = summary
    m = s["machine"]
    lines = [f"# `{args.recipe}` on the default model and corpus", "",
             f"Machine: {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), torch {m['torch']}; git {git}. "
             f"Reproduce: `{command}`.", "",
             "| steps | train tokens | train time (s) | tokens/s | MFU | peak RSS (GiB) | val ppl before | val ppl after | change |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {s['steps']} | {s['train_tokens']:,} | {s['train_seconds']:.0f} | {s['tokens_per_second']:.1f} | {s['mfu']:.1%} | "
             f"{s['peak_memory_bytes'] / 2**30:.2f} | {s['val_perplexity_before']:.3f} | {s['val_perplexity_after']:.3f} | "
             f"{(s['val_perplexity_after'] / s['val_perplexity_before'] - 1):+.1%} |", "",
             f"Validation: {s['val_tokens']:,} tokens of held-out standard-library files (split by content hash).", "",
             "Training loss by step: " + ", ".join(f"{c['step']}: {c['loss']:.3f}" for c in result["loss_curve"])]
    atomic_write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
