"""Why QLoRA trained faster than LoRA on this CPU: the same adapters on the same (dequantised) base weights, run
once through bitsandbytes' NF4 layers and once through plain fp32 layers.

Both models hold identical numbers: the LoRA model's base weights are the NF4 weights dequantised, and both get
the same adapter initialisation, so the forward losses agree to rounding and every difference in the backward is
the 4-bit path's. Measured, side by side in one process:
- the adapters' gradients of both against each other (cosine similarity and relative error per adapter matrix),
  which shows whether the gradient flows through the frozen 4-bit matmuls;
- forward and backward time per micro-batch, alternating the two models, and a torch.profiler table of the
  operators each backward spends its time in.

    python benchmarks/qlora_speed.py [--seq 512] [--repeats 5]

Writes benchmarks/results/qlora_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, write_results  # noqa: E402


def build(seq: int):
    import torch
    from peft import LoraConfig, get_peft_model

    from qtrain.methods import quantization_config, resolve_target_modules
    from qtrain.models import load_model, resolve_model_source
    from qtrain.recipe import Recipe

    source = resolve_model_source(None)
    # exactly what `qtrain fit` loads for method=qlora on a CPU
    q = load_model(source, dtype=torch.float32, quantization_config=quantization_config(Recipe(method="qlora"), "cpu"),
                   device_map={"": "cpu"})
    plain = load_model(source, dtype=torch.float32)
    # the plain model's base weights become exactly the NF4 weights, dequantised
    import bitsandbytes.functional as F

    with torch.no_grad():
        for name, mod in q.named_modules():
            w = getattr(mod, "weight", None)
            if w is not None and type(w).__name__ == "Params4bit":
                plain.get_submodule(name).weight.copy_(F.dequantize_4bit(w.data, w.quant_state).to(torch.float32))
    targets = resolve_target_modules(plain, "all-linear")
    cfg = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    q = get_peft_model(q, LoraConfig(**cfg))
    torch.manual_seed(0)
    plain = get_peft_model(plain, LoraConfig(**cfg))
    # the same non-zero B, so that gradients reach A and flow through every layer
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for (n1, p1), (n2, p2) in zip(q.named_parameters(), plain.named_parameters()):
            assert n1 == n2
            if p1.requires_grad:
                init = torch.randn(p1.shape, generator=gen) * 0.01
                p1.copy_(init)
                p2.copy_(init)
    return q, plain


def grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return float(out.loss), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def timed(model, ids) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def profile_backward(model, ids, rows: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    table = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count} for e in table]


def render(r: dict) -> str:
    g = r["gradients"]
    lines = ["# QLoRA against LoRA on the same dequantised weights (CPU)", "",
             f"Machine: {r['machine']['cpu']} ({r['machine']['cores']} cores), torch {r['machine'].get('torch')}, "
             f"bitsandbytes {r['versions'].get('bitsandbytes')}; git {r['git']}. Reproduce: `{r['command']}`. "
             f"Default model, LoRA r16 on all linear layers, one sequence of {r['seq']} tokens.", "",
             f"Loss: QLoRA {r['loss_qlora']:.5f}, LoRA {r['loss_lora']:.5f}.", "",
             f"Adapter gradients, QLoRA against LoRA over {g['matrices']} matrices: median cosine "
             f"{g['median_cosine']:.4f}, lowest {g['min_cosine']:.4f} ({g['min_cosine_name']}); median relative "
             f"error {g['median_rel_error']:.2e}; gradient norm QLoRA {g['norm_qlora']:.4e}, LoRA {g['norm_lora']:.4e}.",
             "", "| | forward (s, median) | backward (s, median) | step |", "|---|---|---|---|"]
    for k in ("qlora", "lora"):
        t = r["timing"][k]
        lines.append(f"| {k} | {t['forward_s']:.3f} | {t['backward_s']:.3f} | {t['forward_s'] + t['backward_s']:.3f} |")
    for k in ("qlora", "lora"):
        lines += ["", f"Backward of {k}, top operators by self CPU time:", "", "| op | self ms | calls |",
                  "|---|---|---|"]
        lines += [f"| `{x['op']}` | {x['self_ms']} | {x['calls']} |" for x in r["profile"][k]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import torch

    q, plain = build(args.seq)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (1, args.seq), generator=gen)
    lq, gq = grads(q, ids)
    lp, gp = grads(plain, ids)
    cos, rel = {}, {}
    for n in gp:
        a, b = gq[n].flatten(), gp[n].flatten()
        cos[n] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        rel[n] = float((a - b).norm() / b.norm().clamp_min(1e-30))
    worst = min(cos, key=cos.get)
    norm = lambda g: float(torch.sqrt(sum((x.double() ** 2).sum() for x in g.values())))  # noqa: E731
    gradients = {"matrices": len(cos), "median_cosine": statistics.median(cos.values()), "min_cosine": cos[worst],
                 "min_cosine_name": worst, "median_rel_error": statistics.median(rel.values()),
                 "norm_qlora": norm(gq), "norm_lora": norm(gp)}
    timed(q, ids), timed(plain, ids)  # warm-up
    runs = {"qlora": [], "lora": []}
    for _ in range(args.repeats):
        runs["qlora"].append(timed(q, ids))
        runs["lora"].append(timed(plain, ids))
    timing = {k: {"forward_s": statistics.median(f for f, _ in v), "backward_s": statistics.median(b for _, b in v)}
              for k, v in runs.items()}
    prof = {"qlora": profile_backward(q, ids), "lora": profile_backward(plain, ids)}
    result = header("qlora_speed", command=f"python benchmarks/qlora_speed.py --seq {args.seq} --repeats {args.repeats}",
                    seq=args.seq, loss_qlora=lq, loss_lora=lp, gradients=gradients, timing=timing, profile=prof,
                    per_matrix={"cosine": cos, "relative_error": rel})
    md = render(result)
    write_results("qlora_speed", result, md)
    print(md)


if __name__ == "__main__":
    main()
