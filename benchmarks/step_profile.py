"""Where a training micro-step's time goes, by kind of operation, and how fast it could be without the rest.

For each variant a fresh process builds the default model as `qtrain fit` does (qtrain.train's loading and
method preparation, the fused loss), runs two warm-up micro-steps (forward and backward, seq 512), times
``--repeats`` more (the median is the step time) and then records one under torch.profiler. Each operator's
self time is put in a kind: matmuls (split into the adapters' rank-r products and the rest), attention
(scaled_dot_product kernels), dropout (random numbers, masks, the dropout functions), copies and casts,
elementwise and reductions, and the rest (autograd bookkeeping, views, allocation). "If only matmuls and
attention" is the tokens/s the step would reach if every other kind took no time: a ceiling for fusions,
torch.compile and any rewrite that keeps the same matmuls.

    python benchmarks/step_profile.py                       # every variant below
    python benchmarks/step_profile.py --variants lora,full  # writes benchmarks/results/step_profile.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, header, write_results  # noqa: E402

# name -> (recipe, overrides, torch.compile the model)
VARIANTS = {
    "lora": ("cpu-lora", [], False),
    "full": ("cpu-full", [], False),
    "lora-dropout0": ("cpu-lora", ["lora_dropout=0"], False),
    "lora-compile": ("cpu-lora", [], True),
    "full-compile": ("cpu-full", [], True),
    "lora-mb2": ("cpu-lora", ["micro_batch_size=2", "grad_accum_steps=4"], False),
}
KINDS = ["matmul", "matmul (adapter rank)", "attention", "dropout", "copies and casts", "elementwise", "other"]
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul", "aten::_mm"}
DROPOUT = ("random_", "bernoulli", "dropout", "Dropout", "aten::ge")
COPIES = ("copy_", "_to_copy", "clone", "contiguous", "aten::cat", "aten::stack")
ELEMENTWISE = ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::silu", "aten::gelu", "aten::pow",
               "aten::rsqrt", "aten::mean", "aten::sum", "aten::exp", "aten::log", "aten::tanh", "aten::where",
               "aten::masked_fill", "aten::fill_", "aten::zero_", "aten::max", "aten::amax", "aten::softmax",
               "aten::_softmax", "aten::_log_softmax", "aten::sigmoid", "aten::native_layer_norm", "aten::rms_norm",
               "aten::_fused_rms_norm", "aten::addcmul", "aten::addcdiv", "aten::lerp", "aten::sqrt", "aten::clamp",
               "aten::nll_loss", "aten::gather", "aten::scatter", "aten::embedding", "aten::index", "aten::threshold",
               "aten::_log_softmax_backward", "aten::_softmax_backward", "aten::silu_backward", "aten::gelu_backward",
               "aten::native_layer_norm_backward", "aten::embedding_dense_backward", "aten::logsumexp", "aten::eq",
               "aten::ne", "aten::lt", "aten::gt", "aten::abs", "aten::sign", "aten::round",
               "aten::_fused_rms_norm_backward")


def kind_of(name: str, shapes: list, rank: int) -> str:
    if name in MATMULS:
        dims = [d for s in shapes if s for d in s]
        return "matmul (adapter rank)" if rank and rank in dims else "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if any(k in name for k in DROPOUT):
        return "dropout"
    if any(k in name for k in COPIES):
        return "copies and casts"
    if name.startswith(ELEMENTWISE) or "Backward" in name and name.split("Backward")[0] in ("Mul", "Add"):
        return "elementwise"
    return "other"


def worker(name: str, repeats: int, out: Path) -> None:
    import torch
    from accelerate import Accelerator
    from torch.profiler import ProfilerActivity, profile

    from qtrain.loss import forward_loss_sum, fused_head
    from qtrain.measure import peak_flops
    from qtrain.models import load_tokenizer, resolve_model_source
    from qtrain.recipe import load_recipe
    from qtrain.train import _load_prepared_model, build_data

    recipe_name, overrides, compile_ = VARIANTS[name]
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml", ["gradient_checkpointing=false", *overrides])
    accelerator = Accelerator(cpu=True)
    source = resolve_model_source(None)
    tokenizer = load_tokenizer(source)
    packed = build_data(None, recipe, tokenizer)
    net, _ = _load_prepared_model(recipe, source, tokenizer, packed, accelerator)
    net.train()
    head = fused_head(net) if recipe.fused_cross_entropy else None
    compile_s = None
    if compile_:
        net.compile()
    mb = recipe.micro_batch_size
    x, y = packed.train_ids[:mb], packed.train_labels[:mb]

    def micro_step() -> None:
        loss = forward_loss_sum(net, net, x, y, head)
        loss.backward()

    t = time.perf_counter()
    for _ in range(2):  # warm-up (and, with torch.compile, compilation)
        micro_step()
    warmup_s = time.perf_counter() - t
    if compile_:
        compile_s = warmup_s
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        micro_step()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        micro_step()
    kinds = dict.fromkeys(KINDS, 0.0)
    top: dict[str, float] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        k = kind_of(e.key, e.input_shapes or [], recipe.lora_r if recipe.method == "lora" else 0)
        kinds[k] += e.self_cpu_time_total / 1e6
        top[e.key] = top.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
    profiled_s = sum(kinds.values())
    tokens = mb * recipe.seq_len
    out.write_text(json.dumps({
        "variant": name, "method": recipe.method, "micro_batch": mb, "seq_len": recipe.seq_len,
        "overrides": overrides, "compiled": compile_, "compile_seconds": compile_s, "threads": torch.get_num_threads(),
        "step_seconds": step_s, "step_seconds_runs": times, "tokens_per_second": tokens / step_s,
        "profiled_seconds": profiled_s, "kinds_seconds": kinds,
        "top_ops": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12]),
        "matmul_ceiling_flops": peak_flops(torch.device("cpu"))[0]}))


def render(result: dict) -> str:
    rows = result["rows"]
    lines = ["# Where a training micro-step's time goes (default model, seq 512, CPU)", "",
             f"Machine: {result['machine']['cpu']} ({result['machine']['cores']} cores, "
             f"{rows[0]['threads'] if rows else '?'} torch threads), torch {result['machine'].get('torch')}; "
             f"git {result['git']}. Reproduce: `{result['command']}`. Forward and backward of one micro-batch (the "
             "optimizer step is not in it); step time is the median of the timed repeats, and each row the round (a "
             "fresh process, round-robin over the variants) with the median tokens/s; the kinds are the "
             "operators' self time in one more micro-step under torch.profiler (which adds its own overhead, so "
             "they are shares, scaled to the step time). 'If only matmuls and attention' is the tokens/s with every "
             "other kind at zero.", "",
             "| variant | tokens/s | rounds (tokens/s) | " + " | ".join(KINDS) + " | if only matmuls and attention |",
             "|---|---|---|" + "---|" * len(KINDS) + "---|"]
    for r in rows:
        total = r["profiled_seconds"]
        shares = [r["kinds_seconds"][k] / total for k in KINDS]
        core = sum(r["kinds_seconds"][k] for k in ("matmul", "matmul (adapter rank)", "attention")) / total
        ceiling = r["tokens_per_second"] / core if core else float("nan")
        rounds = ", ".join(f"{t:.1f}" for t in r.get("tokens_per_second_rounds", [r["tokens_per_second"]]))
        lines.append(f"| {r['variant']} | {r['tokens_per_second']:.1f} | {rounds} | "
                     + " | ".join(f"{100 * s:.1f}%" for s in shares) + f" | {ceiling:.0f} |")
    lines += ["", "Compilation (torch.compile, first two micro-steps): "
              + (", ".join(f"{r['variant']} {r['compile_seconds']:.0f} s" for r in rows if r["compiled"]) or "none"),
              "", "Top operators by self time (seconds in the profiled micro-step):", ""]
    for r in rows:
        lines.append(f"- {r['variant']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["top_ops"].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="lora,full,lora-dropout0,lora-compile,full-compile,lora-mb2",
                    help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=3, help="timed micro-steps per variant and process")
    ap.add_argument("--rounds", type=int, default=2,
                    help="fresh processes per variant, round-robin over the variants (the machine is shared: a slow "
                         "spell lands on every variant alike); each row is the round with the median tokens/s (the "
                         "lower middle one of an even count)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.repeats, Path(args.out))
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out = Path(f.name)
            proc = subprocess.run([sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats),
                                   "--out", str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(out.read_text()))
            out.unlink()
            print(f"{name}: {runs[name][-1]['tokens_per_second']:.1f} tokens/s", file=sys.stderr)
    rows = []
    for name in names:
        ranked = sorted(runs[name], key=lambda r: r["tokens_per_second"])
        row = dict(ranked[(len(ranked) - 1) // 2])
        row["tokens_per_second_rounds"] = [r["tokens_per_second"] for r in runs[name]]
        rows.append(row)
    command = "python benchmarks/step_profile.py" + (f" --variants {args.variants}" if args.variants != ap.get_default(
        "variants") else "") + (f" --repeats {args.repeats}" if args.repeats != 3 else "") + (
        f" --rounds {args.rounds}" if args.rounds != 2 else "")
    result = header("step_profile", command=command, rounds=args.rounds, rows=rows)
    md = render(result)
    write_results("step_profile", result, md)
    print(md)


if __name__ == "__main__":
    main()
