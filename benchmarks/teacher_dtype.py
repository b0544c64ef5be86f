"""The distillation teacher held in each `distill_teacher_dtype`: its weights' bytes (measured on the tensors held,
against the planner's term), the seconds of its forward pass per 512-token micro-batch (the cost it adds to every
training step), and how far its outputs move from the fp32 teacher's: KL(fp32 teacher || this teacher) per token
and its own validation perplexity, on the default model and the validation split `qtrain fit` uses.

    python benchmarks/teacher_dtype.py [--val-sequences 16]

Writes benchmarks/results/teacher_dtype.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from common import header, write_results  # noqa: E402 - benchmarks/common.py, beside this script

DTYPES = ("float32", "bfloat16", "int8", "nf4")


def held_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def score(teacher, reference_logprobs, packed) -> dict:
    seconds, kl, nll, tokens = [], 0.0, 0.0, 0
    for i in range(len(packed.val_ids)):
        x, y = packed.val_ids[i:i + 1], packed.val_labels[i:i + 1]
        t0 = time.perf_counter()
        logits = teacher(input_ids=x, use_cache=False).logits.float()
        seconds.append(time.perf_counter() - t0)
        logp = torch.log_softmax(logits[0, :-1], -1)
        mask = y[0, 1:] != -100
        nll -= float(logp[mask].gather(-1, y[0, 1:][mask, None]).sum())
        if reference_logprobs is not None:
            ref = reference_logprobs[i]
            kl += float((ref.exp() * (ref - logp)).sum(-1)[mask].sum())
        tokens += int(mask.sum())
    seconds = sorted(seconds[1:])  # the first call warms up
    return {"forward_seconds_median": round(seconds[len(seconds) // 2], 3),
            "val_ppl": round(math.exp(nll / tokens), 3),
            "kl_from_fp32_per_token": None if reference_logprobs is None else round(kl / tokens, 5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--val-sequences", type=int, default=16, help="validation sequences of 512 tokens")
    args = ap.parse_args()

    from qtrain.models import load_model, load_tokenizer, resolve_model_source
    from qtrain.plan import model_shape, predict
    from qtrain.recipe import load_recipe
    from qtrain.train import build_data, build_teacher

    recipe = load_recipe("recipes/cpu-bitnet.yaml", [f"val_max_sequences={args.val_sequences}", "distill_weight=0.5"])
    source = resolve_model_source(None)
    packed = build_data(None, recipe, load_tokenizer(source))
    base = load_model(source, dtype=torch.float32).eval()
    shape = model_shape(None)
    cpu = torch.device("cpu")
    rows, reference = [], None
    for dtype in DTYPES:
        teacher = build_teacher(base, dtype, cpu)
        row = {"teacher_dtype": dtype, "weights_bytes": held_bytes(teacher),
               "planner_teacher_weights": predict(shape, dataclasses.replace(recipe, distill_teacher_dtype=dtype),
                                                  "cpu").terms["teacher_weights"]}
        row.update(score(teacher, reference, packed))
        if dtype == "float32":
            with torch.no_grad():
                reference = [torch.log_softmax(teacher(input_ids=packed.val_ids[i:i + 1], use_cache=False)
                                               .logits.float()[0, :-1], -1) for i in range(len(packed.val_ids))]
            row["kl_from_fp32_per_token"] = 0.0
        print(row, flush=True)
        rows.append(row)
        del teacher
    fp32 = rows[0]
    for r in rows:
        r["weights_vs_fp32"] = round(r["weights_bytes"] / fp32["weights_bytes"], 3)
        r["forward_vs_fp32"] = round(r["forward_seconds_median"] / fp32["forward_seconds_median"], 2)
    result = header("teacher_dtype", command=f"python benchmarks/teacher_dtype.py --val-sequences {args.val_sequences}",
                    val_tokens=args.val_sequences * recipe.seq_len, rows=rows)
    write_results("teacher_dtype", result, render(result))
    print(render(result))


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"# The distillation teacher in each dtype (default model, {m.get('cpu', 'CPU')})", "",
             f"`{r['command']}` at {r['git']}: the frozen teacher built by `qtrain fit` (`qtrain.train.build_teacher`), its "
             f"forward pass over one 512-token sequence, {r['val_tokens']:,} validation tokens.", "",
             "| teacher | weights held | vs fp32 | planner's term | forward s / 512 tokens | vs fp32 | "
             "KL(fp32 ‖ it) / token | its val perplexity |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        lines.append(f"| {x['teacher_dtype']} | {x['weights_bytes'] / 2**20:,.1f} MiB | {x['weights_vs_fp32']:.3f}x | "
                     f"{x['planner_teacher_weights'] / 2**20:,.1f} MiB | {x['forward_seconds_median']:.3f} | "
                     f"{x['forward_vs_fp32']:.2f}x | {x['kl_from_fp32_per_token']:.5f} | {x['val_ppl']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
