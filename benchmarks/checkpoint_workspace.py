"""How much of one layer the backward of a checkpointed layer adds beside it, with jemalloc.

With gradient checkpointing the planner counts the layers' inputs, the recomputed layer's saved tensors (one
layer, ``plan.layer_activation_bytes``) and a backward workspace beside them. Here that workspace is measured as
the growth of the peak RSS between two micro-batches (8 and 16 sequences of 256 tokens, LoRA): everything fixed
(runtime, weights, adapters) cancels, and what grows is the inputs, the recomputed layer and the workspace. So

    workspace share = (peak(16) - peak(8) - inputs growth) / one layer's growth - 1

Small micro-batches are not used: their peak can be set while the weights load (qtrain.plan's loading peak), so
their differences say nothing about the backward. Each variant runs ``--times`` times, each in a fresh process
with jemalloc preloaded (one arena, as ``qtrain fit`` runs), round-robin.

    python benchmarks/checkpoint_workspace.py [--times 2]   # writes results/checkpoint_workspace.{json,md}
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_sha, header, write_results  # noqa: E402
from memory_calibration import measure  # noqa: E402
from plan_heldout import SHAPES, SHAPES_THIRD, build  # noqa: E402

# (set, shape): a narrow and a wide layer, from the held-out sets
CASES = [(SHAPES_THIRD, "granite (multipliers, MHA, tied)"), (SHAPES_THIRD, "qwen2 (wide and shallow, GQA, untied)"),
         (SHAPES, "llama-deep-narrow (MQA, untied)")]
SEQ, SMALL, LARGE = 256, 8, 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--times", type=int, default=2)
    args = ap.parse_args()
    from qtrain.measure import find_jemalloc, jemalloc_preload_env
    from qtrain.plan import layer_activation_bytes, model_shape
    from qtrain.recipe import Recipe

    if find_jemalloc() is None:
        raise SystemExit("no libjemalloc.so.2 found; apt install libjemalloc2")
    os.environ.update(jemalloc_preload_env(find_jemalloc(), os.environ))  # inherited by each worker
    git = git_sha()  # the code that measured, before any edit made while it runs
    recipe = Recipe(method="lora", gradient_checkpointing=True, seq_len=SEQ)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qtrain-workspace-") as d:
        models = {label: build(shapes[label], Path(d) / f"m{i}") for i, (shapes, label) in enumerate(CASES)}
        specs = [{"model": models[label], "label": label, "method": "lora", "gc": True, "seq": SEQ, "mb": mb}
                 for _, label in CASES for mb in (SMALL, LARGE)]
        runs = [[measure(s) for s in specs] for _ in range(args.times)]
        for _, label in CASES:
            shape = model_shape(models[label])
            grown = (LARGE - SMALL) * SEQ
            layer = layer_activation_bytes(shape, recipe, grown)
            inputs = shape.n_layers * grown * shape.hidden * 4
            peaks = {mb: [run[i]["measured_peak_bytes"] for run in runs for i, s in enumerate(specs)
                          if s["label"] == label and s["mb"] == mb and "error" not in run[i]] for mb in (SMALL, LARGE)}
            growth = statistics.median(peaks[LARGE]) - statistics.median(peaks[SMALL])
            rows.append({"label": label, "peaks_bytes": peaks, "growth_bytes": growth, "inputs_growth_bytes": inputs,
                         "layer_growth_bytes": layer, "workspace_share": round((growth - inputs) / layer - 1, 2)})
    result = header("checkpoint_workspace", git=git, seq=SEQ, micro_batches=[SMALL, LARGE], times=args.times,
                    command=f"python benchmarks/checkpoint_workspace.py --times {args.times}", rows=rows)
    md = render(result)
    write_results("checkpoint_workspace", result, md)
    print(md)


def render(result: dict) -> str:
    mib = 2**20
    lines = ["# The backward workspace of a checkpointed layer, with jemalloc", "",
             f"Machine: {result['machine']['cpu']} ({result['machine']['cores']} cores), torch "
             f"{result['machine'].get('torch')}; git {result['git']}. Reproduce: `{result['command']}`. LoRA with "
             f"checkpointing, {result['seq']} tokens per sequence, peak RSS of a fresh process (2 optimizer steps) at "
             f"micro-batches {result['micro_batches'][0]} and {result['micro_batches'][1]}; the growth between them "
             "less the layers' inputs, over one layer's saved tensors, is 1 + the workspace's share of a layer "
             "(the planner counted 1 + 1).", "",
             "| shape | peaks at 8 (MiB) | peaks at 16 (MiB) | growth (MiB) | inputs (MiB) | one layer (MiB) "
             "| workspace share |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        small, large = (", ".join(f"{p / mib:.0f}" for p in r["peaks_bytes"][k]) for k in r["peaks_bytes"])
        lines.append(f"| {r['label']} | {small} | {large} | {r['growth_bytes'] / mib:.0f} | "
                     f"{r['inputs_growth_bytes'] / mib:.0f} | {r['layer_growth_bytes'] / mib:.0f} | "
                     f"{r['workspace_share']:+.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
