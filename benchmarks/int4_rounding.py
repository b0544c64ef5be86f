"""How much each int4 rounding costs the default model, in PyTorch: perplexity with every linear layer except the
LM head replaced by its 4-bit dequantized weights on MatMulNBits' grid (blocks of 32), for round-to-nearest and
GPTQ (act-order), symmetric and with zero points. This isolates the weight rounding from the ONNX runtime's own
choices (8-bit LM head, int8 activations), which export_speed.py measures end to end.
Writes benchmarks/results/int4_rounding.{json,md}.

    python benchmarks/int4_rounding.py [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

from common import git_sha  # noqa: E402 - benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {  # label: (rounding, symmetric, act_order)
    "GPTQ, symmetric, act-order (default)": ("gptq", True, True),
    "GPTQ, zero points, act-order": ("gptq", False, True),
    "round-to-nearest, zero points": ("rtn", False, False),
    "round-to-nearest, symmetric (onnxruntime's default)": ("rtn", True, False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        render(json.loads((RESULTS / "int4_rounding.json").read_text()))
        return
    import torch
    from torch import nn

    from qtrain.export.gptq import calibration_sequences, collect_hessians, dequantize, gptq, rtn_grid
    from qtrain.export.onnx import heldout_sequences, merged_model
    from qtrain.measure import machine_info

    torch.set_num_threads(args.threads)
    model, tok, _ = merged_model(None)
    model.eval()
    seqs = heldout_sequences(tok, None, 2048)

    def perplexity(m) -> float:
        nll = n = 0.0
        with torch.no_grad():
            for i in range(len(seqs)):
                ids = seqs[i:i + 1]
                logits = m(input_ids=ids, use_cache=False).logits.float()[0, :-1]
                nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                n += ids.shape[1] - 1
        return math.exp(nll / n)

    base = perplexity(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    calib = calibration_sequences(tok, None, 64)
    hs = collect_hessians(model, calib, names)
    rows = []
    for label, (how, symmetric, act_order) in VARIANTS.items():
        m = copy.deepcopy(model)
        mods = dict(m.named_modules())
        t = time.perf_counter()
        for n in names:
            w = mods[n].weight.data
            q = rtn_grid(w, 32, symmetric) if how == "rtn" else gptq(w, hs[n], 32, symmetric=symmetric, act_order=act_order)
            mods[n].weight.data = dequantize(q[0], q[1], 32, q[2])
        seconds = time.perf_counter() - t
        p = perplexity(m)
        rows.append({"variant": label, "rounding": how, "symmetric": symmetric, "act_order": act_order,
                     "perplexity": p, "rel_change": p / base - 1, "seconds": round(seconds, 1)})
        print(f"{label}: {p:.3f} ({100 * (p / base - 1):+.1f}%)", flush=True)
        del m
    git = git_sha()
    render({"benchmark": "int4_rounding", "git": git, "machine": machine_info(), "fp32_perplexity": base,
            "positions": int(seqs.numel() - len(seqs)), "layers": len(names), "calibration_tokens": int(calib.numel()),
            "rows": rows, "command": "python benchmarks/int4_rounding.py"})


def render(result: dict) -> None:
    from qtrain.io import atomic_write_json, atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "int4_rounding.json", result)
    m = result["machine"]
    lines = ["# int4 rounding on the default model (PyTorch, weights only)", "",
             f"Machine: {m['cpu']} ({m['cores']} cores); git {result['git']}. Reproduce: `{result['command']}`. "
             f"{result['layers']} linear layers (all but the LM head) on MatMulNBits' 4-bit grid, blocks of 32; GPTQ "
             f"Hessians from {result['calibration_tokens']:,} tokens of training-split code; perplexity on "
             f"{result['positions']:,} held-out positions (validation split). fp32: {result['fp32_perplexity']:.3f}.", "",
             "| rounding | perplexity | change vs fp32 |", "|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['perplexity']:.3f} | {100 * r['rel_change']:+.1f}% |")
    atomic_write_text(RESULTS / "int4_rounding.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
