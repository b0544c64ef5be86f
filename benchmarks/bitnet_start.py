"""Where a ternary model starts: the default model's validation perplexity right after conversion to BitNet b1.58,
for each way of choosing the ternary values and scales, and what each file format can carry. Also the packed
file actually written (bf16 embeddings) against the bf16 model, and what storing those tensors in bf16 changes.

    python benchmarks/bitnet_start.py [--val-sequences 16]

No training: each option ternarises the pretrained weights of every converted layer (activations int8 per token,
as in training and in transformers' BitLinear) and is scored on the validation split `qtrain fit` uses with the
default recipe. Writes benchmarks/results/bitnet_start.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from common import header, write_results  # noqa: E402 - benchmarks/common.py, beside this script

from qtrain.bitnet_gptq import SCALE_MULTIPLIERS as SCALES  # noqa: E402

# name: (what it is, where it can be stored)
OPTIONS = {
    "absmean, per tensor": ("the paper's: scale 1 / mean|W| per tensor, round to {-1, 0, 1}",
                            "transformers BitLinear (packed), GGUF TQ2_0 / TQ1_0"),
    "TWN, per tensor": ("ternary weight networks (Li et al. 2016): threshold 0.7 mean|W|, value the mean |W| above it",
                        "transformers BitLinear (packed), GGUF TQ2_0 / TQ1_0"),
    "least squares, per tensor": ("the scale on a 64-point grid (0.3x-3x absmean) that minimises ||W - Wq||^2",
                                  "transformers BitLinear (packed), GGUF TQ2_0 / TQ1_0"),
    "absmean, per row": ("scale 1 / mean|W| of each output row", "GGUF TQ2_0 / TQ1_0 (fp16 scale per 256 weights); "
                         "not transformers BitLinear (one scale per layer)"),
    "least squares, per row": ("the least-squares scale of each output row", "GGUF TQ2_0 / TQ1_0; not BitLinear"),
}


@torch.no_grad()
def ternary(w: torch.Tensor, option: str) -> torch.Tensor:
    """The dequantised ternary weight (values x scale) for ``option``."""
    per_row = option.endswith("per row")
    dims = {"dim": -1, "keepdim": True} if per_row else {}
    absmean = w.abs().mean(**dims).clamp(min=1e-8)
    if option.startswith("absmean"):
        return (w / absmean).round().clamp(-1, 1) * absmean
    if option.startswith("TWN"):
        keep = w.abs() > 0.7 * absmean
        value = (w.abs() * keep).sum(**dims) / keep.sum(**dims).clamp(min=1)
        return torch.sign(w) * keep * value
    best, best_err = None, None
    for c in torch.linspace(0.3, 3.0, 64):
        scale = absmean * c
        q = (w / scale).round().clamp(-1, 1) * scale
        err = ((w - q) ** 2).sum(**dims)
        if best is None:
            best, best_err = q, err
        else:
            better = err < best_err
            best = torch.where(better, q, best) if per_row else (q if better else best)
            best_err = torch.minimum(err, best_err)
    return best


def gptq_row(model, packed, shadow, n: int) -> dict:
    """The error-compensating start (qtrain/bitnet_gptq.py) through the training layers themselves, calibrated on
    the first ``n`` training sequences (never the validation split); the shadow weights are restored after."""
    from qtrain import bitnet
    from qtrain.bitnet_gptq import gptq_start

    layers = bitnet.layers(model)
    for name, m in layers.items():  # gptq_start writes into the weights in place: keep ``shadow`` the original
        m.weight.data = shadow[name].clone()
    report = gptq_start(model, packed.train_ids[:n], progress=print)
    deq = {}
    for name, m in layers.items():
        t, inv = bitnet.ternarize(m.weight)
        deq[name] = t / inv
    err = sum(float(((shadow[n_] - deq[n_]) ** 2).sum()) for n_ in layers)
    norm = sum(float((w ** 2).sum()) for w in shadow.values())
    row = {"option": "GPTQ, per tensor (block by block)", "relative_weight_error": round(err / norm, 4),
           "val_ppl": round(val_perplexity(model, packed), 1), "gptq": report,
           "what": f"error-compensating rounding onto {{-1, 0, 1}} x s, s the best of {len(SCALES)} multiples of "
                   f"mean|W|, calibrated on {report['calibration_tokens']:,} training tokens "
                   f"({report['seconds']:.0f} s)",
           "carried_by": "transformers BitLinear (packed), GGUF TQ2_0 / TQ1_0"}
    for name, m in layers.items():
        m.weight.data = shadow[name].clone()
    return row


def val_perplexity(model, packed, batch: int = 4) -> float:
    from qtrain.loss import forward_loss_sum, fused_head

    model.eval()
    head = fused_head(model)
    total = tokens = 0.0
    with torch.no_grad():
        for s in range(0, len(packed.val_ids), batch):
            y = packed.val_labels[s:s + batch]
            total += float(forward_loss_sum(model, model, packed.val_ids[s:s + batch], y, head))
            tokens += int((y[:, 1:] != -100).sum())
    return math.exp(total / tokens)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--val-sequences", type=int, default=16, help="validation sequences of 512 tokens")
    ap.add_argument("--calib-sequences", type=int, default=16,
                    help="training sequences of 512 tokens that calibrate the GPTQ start")
    args = ap.parse_args()

    from qtrain import bitnet
    from qtrain.models import load_model, load_tokenizer, resolve_model_source
    from qtrain.recipe import load_recipe
    from qtrain.train import build_data

    recipe = load_recipe("recipes/cpu-bitnet.yaml", [f"val_max_sequences={args.val_sequences}"])
    source = resolve_model_source(None)
    tok = load_tokenizer(source)
    packed = build_data(None, recipe, tok)
    base = load_model(source, dtype=torch.float32)
    t0 = time.perf_counter()
    rows = [{"option": "pretrained model (not ternary)", "val_ppl": round(val_perplexity(base, packed), 3)}]
    bitnet.convert(base)
    layers = bitnet.layers(base)
    shadow = {n: m.weight.detach().clone() for n, m in layers.items()}
    hooks = [m.register_forward_pre_hook(lambda mod, a: (bitnet.quantize_activations(a[0]),) + a[1:])
             for m in layers.values()]
    bitnet.set_strength(base, 0.0)  # weights are replaced below; activations are quantised by the hooks
    for option, (what, carried) in OPTIONS.items():
        for n, m in layers.items():
            m.weight.data = ternary(shadow[n], option)
        err = sum(float(((shadow[n] - m.weight) ** 2).sum()) for n, m in layers.items())
        norm = sum(float((w ** 2).sum()) for w in shadow.values())
        rows.append({"option": option, "what": what, "carried_by": carried,
                     "relative_weight_error": round(err / norm, 4), "val_ppl": round(val_perplexity(base, packed), 1)})
        print(rows[-1], flush=True)
    for h in hooks:
        h.remove()
    for n, m in layers.items():
        m.weight.data = shadow[n]
    bitnet.set_strength(base, 1.0)
    # the absmean layer itself (the training forward) must agree with the hooked emulation above
    training_forward_ppl = round(val_perplexity(base, packed), 1)
    rows.append(gptq_row(base, packed, shadow, args.calib_sequences))
    print(rows[-1], flush=True)

    sizes = file_sizes(base, tok, source, packed)
    result = header("bitnet_start", command=f"python benchmarks/bitnet_start.py --val-sequences {args.val_sequences}",
                    val_tokens=int(packed.val_ids.numel()), rows=rows, training_forward_ppl=training_forward_ppl,
                    files=sizes, seconds=round(time.perf_counter() - t0, 1))
    write_results("bitnet_start", result, render(result))
    print(render(result))


def file_sizes(model, tok, source, packed) -> dict:
    """The packed file written with bf16 and with fp32 embeddings and norms, the bf16 model, and the
    perplexity difference that the bf16 rounding makes (loaded back through transformers' BitLinear)."""
    from safetensors.torch import save_file

    from qtrain import bitnet
    from qtrain.models import load_model

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, dtype in (("packed, bf16 embeddings and norms", torch.bfloat16),
                            ("packed, fp32 embeddings and norms", torch.float32)):
            bitnet.save_packed(model, tok, tmp / slug(name), False, 1e-6, float_dtype=dtype)
            out[name] = (tmp / slug(name) / "model.safetensors").stat().st_size
        ref = load_model(source, dtype=torch.bfloat16)
        sd = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight" or
              not ref.config.tie_word_embeddings}
        save_file(sd, str(tmp / "bf16.safetensors"))
        out["bf16 model"] = (tmp / "bf16.safetensors").stat().st_size
        loaded = {name: round(val_perplexity(bitnet.load_packed(tmp / slug(name)), packed), 1)
                  for name in ("packed, bf16 embeddings and norms", "packed, fp32 embeddings and norms")}
    return {"bytes": out, "bf16_over_packed": round(out["bf16 model"] / out["packed, bf16 embeddings and norms"], 2),
            "loaded_val_ppl": loaded}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def render(r: dict) -> str:
    m = r["machine"]
    lines = ["# BitNet b1.58: where the ternary model starts (default model, no training)", "",
             f"Machine: {m.get('cpu')} ({m.get('cores')} cores); git {r['git']}. Reproduce: `{r['command']}`. "
             f"Validation perplexity on {r['val_tokens']:,} held-out tokens (the default recipe's split), every "
             "converted layer ternary with int8 activations.", "",
             "| start | relative weight error | val ppl | what | stored by |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        ppl = f"{row['val_ppl']:,.1f}"
        lines.append(f"| {row['option']} | {row.get('relative_weight_error', '-')} | {ppl} | {row.get('what', '')} | "
                     f"{row.get('carried_by', '')} |")
    lines += ["", f"The training layer (BitNetLinear at strength 1) gives {r['training_forward_ppl']:,.1f}, the "
              "absmean row computed by the layer itself.", "", "## The packed file (written, not computed)", "",
              "| file | MB | bf16 model / this | val ppl loaded back (transformers BitLinear) |", "|---|---|---|---|"]
    b = r["files"]["bytes"]
    for name, size in b.items():
        ppl = r["files"]["loaded_val_ppl"].get(name)
        lines.append(f"| {name} | {size / 1e6:.1f} | {b['bf16 model'] / size:.2f}x | "
                     f"{'-' if ppl is None else f'{ppl:,.1f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
