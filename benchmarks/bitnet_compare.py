"""BitNet b1.58 against full fine-tuning and LoRA on the default model: quality, size, memory, inference speed.

Four runs on the same data, same steps and seed (recipes/cpu-full.yaml, cpu-lora.yaml, cpu-bitnet.yaml with and
without the lambda warmup), each through the real CLI in its own process, with validation every few steps for
the curves. Then: checkpoint sizes on disk (packed ternary vs bf16 vs fp32, linear layers and the rest),
weight memory when loaded, and decode speed at batch 1 (PyTorch fp32 vs the ternary model in PyTorch, eager and
torch.compile'd; llama.cpp on the GGUF files where llama-cpp-python is installed), each in its own process.
Writes benchmarks/results/bitnet_compare.{json,md,png}.

    python benchmarks/bitnet_compare.py [--steps 12] [--eval-every 3] [--keep DIR] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import git_sha  # noqa: E402 - benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RUNS = {  # name: (recipe, overrides)
    "full fp32": ("cpu-full.yaml", []),
    "LoRA r16": ("cpu-lora.yaml", []),
    # cpu-bitnet.yaml as it was when these were measured: 8 sequences a step at lr 3e-4 without distillation, a
    # 10-step lambda warmup
    "BitNet, lambda warmup": ("cpu-bitnet.yaml", ["grad_accum_steps=8", "bitnet_warmup_steps=10", "learning_rate=3e-4",
                                                  "distill_weight=0"]),
    "BitNet, no warmup": ("cpu-bitnet.yaml", ["grad_accum_steps=8", "bitnet_warmup_steps=0", "learning_rate=3e-4",
                                              "distill_weight=0"]),
}


def train(work: Path, steps: int, eval_every: int) -> dict:
    out = {}
    for name, (recipe, extra) in RUNS.items():
        run = work / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        cmd = [sys.executable, "-m", "qtrain", "fit", "--recipe", f"recipes/{recipe}", "-o", str(run), "--overwrite",
               f"max_steps={steps}", f"eval_every={eval_every}", "save_every=0", *extra]
        print("$", " ".join(cmd[2:]), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        summary = json.loads((run / "summary.json").read_text())
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        val = [{"step": 0, "val_ppl": summary["val_perplexity_before"]}]
        val += [{"step": x["step"], "val_ppl": round(math.exp(x["val_loss"]), 3)} for x in lines if "val_loss" in x]
        val.append({"step": summary["steps"], "val_ppl": summary["val_perplexity_after"]})
        out[name] = {"recipe": recipe, "overrides": extra, "dir": str(run), "wall_seconds": round(time.perf_counter() - start, 1),
                     "summary": {k: summary[k] for k in ("steps", "train_seconds", "tokens_per_second", "peak_memory_bytes",
                                                         "predicted_peak_bytes", "val_perplexity_before",
                                                         "val_perplexity_after", "trainable_params")},
                     "train_loss": [{"step": x["step"], "loss": x["loss"], **({"lambda": x["bitnet_strength"]}
                                                                              if "bitnet_strength" in x else {})}
                                    for x in lines if "loss" in x],
                     "val_curve": val}
    return out


def _split_bytes(path: Path) -> dict:
    """Bytes of a safetensors file by part: ternary-able linear layers vs everything else."""
    from safetensors import safe_open

    parts = {"linear_layers": 0, "other": 0}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            n = math.prod(t.get_shape()) * {"F32": 4, "BF16": 2, "F16": 2, "U8": 1, "I8": 1}[t.get_dtype()]
            linear = any(s in k for s in ("_proj.", "fc1", "fc2")) and "lm_head" not in k
            parts["linear_layers" if linear else "other"] += n
    parts["file"] = path.stat().st_size
    return parts


def sizes(work: Path, bitnet_dir: Path) -> dict:
    import torch

    from qtrain.models import load_model, resolve_model_source

    out = {}
    base = load_model(resolve_model_source(None))
    for dtype in ("float32", "bfloat16"):
        d = work / f"base-{dtype}"
        base.to(getattr(torch, dtype)).save_pretrained(d, safe_serialization=True)
        out[dtype] = _split_bytes(d / "model.safetensors")
    out["bitnet packed"] = _split_bytes(bitnet_dir / "model.safetensors")
    return out


def speeds(work: Path, bitnet_dir: Path, threads: int) -> dict:
    from qtrain.export.gguf import export_gguf
    from qtrain.models import model_dir_for, resolve_model_source

    targets = {"PyTorch fp32 (base)": (str(model_dir_for(resolve_model_source(None))), {}),
               "PyTorch ternary, eager": (str(bitnet_dir), {}),
               "PyTorch ternary, torch.compile": (str(bitnet_dir), {"QTRAIN_BITNET_COMPILE": "1"})}
    gguf = {}
    g = export_gguf(str(bitnet_dir), work / "bitnet-tq2_0.gguf", overwrite=True, positions=1024)
    gguf["tq2_0"] = {"bytes": g["bytes"], "tensor_types": g["tensor_types"], "verify": g["verify"]}
    g1 = export_gguf(str(bitnet_dir), work / "bitnet-tq1_0.gguf", outtype="tq1_0", overwrite=True, positions=256)
    gguf["tq1_0"] = {"bytes": g1["bytes"], "tensor_types": g1["tensor_types"]}
    q8 = export_gguf(None, work / "base-q8_0.gguf", outtype="q8_0", overwrite=True, positions=256)
    gguf["base q8_0"] = {"bytes": q8["bytes"]}
    try:
        import llama_cpp  # noqa: F401

        targets["llama.cpp TQ2_0 (ternary)"] = (str(work / "bitnet-tq2_0.gguf"), {})
        targets["llama.cpp TQ1_0 (ternary)"] = (str(work / "bitnet-tq1_0.gguf"), {})
        targets["llama.cpp Q8_0 (base)"] = (str(work / "base-q8_0.gguf"), {})
    except ImportError:
        gguf["note"] = "llama-cpp-python not installed: GGUF files written and verified, not timed"
    results = {}
    for name, (path, env) in targets.items():
        print(f"timing {name} ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "qtrain.export.speed", path, "--threads", str(threads)],
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
        results[name] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                         {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
    base = results["PyTorch fp32 (base)"].get("decode_tokens_per_second")
    for r in results.values():
        if base and "decode_tokens_per_second" in r:
            r["decode_vs_pytorch_fp32"] = round(r["decode_tokens_per_second"] / base, 3)
    return {"speed": results, "gguf": gguf}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in result["runs"].items():
        v = r["val_curve"]
        a.plot([x["step"] for x in v], [x["val_ppl"] for x in v], marker="o", label=name)
        t = r["train_loss"]
        b.plot([x["step"] for x in t], [x["loss"] for x in t], label=name)
    a.set_yscale("log")
    a.set_xlabel("optimizer step (4,096 tokens each)")
    a.set_ylabel("validation perplexity (log scale)")
    a.set_title("Validation perplexity (held-out stdlib files)")
    b.set_xlabel("optimizer step (4,096 tokens each)")
    b.set_ylabel("training loss (nats/token)")
    b.set_title("Training loss")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M on {result['machine']['cpu']}, same data, steps and seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(result: dict) -> None:
    from qtrain.io import atomic_write_text

    m = result["machine"]
    lines = ["# BitNet b1.58 vs full fine-tuning and LoRA (default model, CPU)", "",
             f"Machine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}; git {result['git']}. "
             f"Reproduce: `{result['command']}`.", "",
             f"Same data, same {result['steps']} steps (4,096 tokens each), same seed; validation perplexity on "
             "held-out standard-library files. BitNet's validation always runs fully ternary (lambda = 1), "
             "the model that is saved; its 'before' is the pretrained model made ternary with no training.", "",
             "| run | steps | peak RSS (GiB) | predicted (GiB) | val ppl before | val ppl after |",
             "|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        s = r["summary"]
        pred = s.get("predicted_peak_bytes")
        lines.append(f"| {name} | {s['steps']} | {s['peak_memory_bytes'] / 2**30:.2f} | {pred / 2**30 if pred else float('nan'):.2f} | "
                     f"{s['val_perplexity_before']:,.2f} | {s['val_perplexity_after']:,.2f} |")
    lines += ["", "Validation perplexity by step: " + "; ".join(
        f"{n}: " + ", ".join(f"{x['step']}: {x['val_ppl']:,.1f}" for x in r["val_curve"]) for n, r in result["runs"].items()),
        "", "![curves](bitnet_compare.png)", "",
        "## Size on disk (safetensors)", "",
        "| format | linear layers (MB) | embeddings, norms (MB) | file (MB) | linear: bf16 / this | file: bf16 / this |",
        "|---|---|---|---|---|---|"]
    sz = result["sizes"]
    bf = sz["bfloat16"]
    for name, p in sz.items():
        lines.append(f"| {name} | {p['linear_layers'] / 1e6:.1f} | {p['other'] / 1e6:.1f} | {p['file'] / 1e6:.1f} | "
                     f"{bf['linear_layers'] / p['linear_layers']:.2f}x | {bf['file'] / p['file']:.2f}x |")
    pk = sz.get("bitnet packed")
    share = f"{pk['other'] / pk['file']:.0%}" if pk else "most"
    lines += ["", "Training throughput is not compared here (the four runs did not have the CPU to themselves; "
              "`qtrain bench --matrix methods` measures it side by side).", "",
              "The packed checkpoint keeps embeddings (tied with the LM head) and norms in fp32, as trained, so "
              f"the training-time forward is reproduced exactly; they are {share} of this model's file" +
              (f" (stored in bf16 instead, the same file would be {(pk['linear_layers'] + bf['other']) / 1e6:.1f} MB, "
               f"{bf['file'] / (pk['linear_layers'] + bf['other']):.2f}x smaller than bf16: arithmetic on the "
               "measured parts, not a file written)" if pk else "") + ". GGUF files: " +
              ", ".join(f"{k} {v['bytes'] / 1e6:.1f} MB" for k, v in result["gguf"].items() if isinstance(v, dict) and "bytes" in v) + ".",
              "", "## Inference at batch 1 (each in its own process, same prompt and threads)", "",
              "| runtime | weights in memory (MB) | load (s) | prefill 512 (ms) | decode tok/s | vs PyTorch fp32 | peak RSS (GiB) |",
              "|---|---|---|---|---|---|---|"]
    for name, r in result["speed"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {r['load_seconds']:.1f} | {r['prefill_512_ms']:.0f} | "
                     f"{r['decode_tokens_per_second']:.1f} | {r.get('decode_vs_pytorch_fp32', float('nan')):.2f}x | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} |")
    g = result["gguf"].get("tq2_0", {}).get("verify", {})
    tw = g.get("ternary_weights", {})
    if tw:
        lines += ["", f"GGUF TQ2_0 read back: ternary tensors {tw['types']}, pattern "
                  f"{'identical' if tw['ternary_pattern_equal'] else 'DIFFERENT'}, max relative weight error "
                  f"{tw['max_relative_error']:.1e} (fp16 block scales); next-token agreement with the PyTorch ternary "
                  f"model (int8 activations) {g['next_token_agreement']:.2%} over {g['positions']:,} positions "
                  f"(transformers' GGUF loader dequantizes: fp32 activations)."]
    if result["gguf"].get("note"):
        lines += ["", result["gguf"]["note"] + "."]
    atomic_write_text(RESULTS / "bitnet_compare.md", "\n".join(lines) + "\n")
    plot(result, RESULTS / "bitnet_compare.png")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", help="keep the runs here (reused by --skip-training)")
    ap.add_argument("--skip-training", action="store_true", help="reuse the runs saved in --keep")
    ap.add_argument("--train-only", action="store_true", help="stop after the training runs (resume with --skip-training)")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        render(json.loads((RESULTS / "bitnet_compare.json").read_text()))
        return
    from qtrain.io import atomic_write_json
    from qtrain.measure import machine_info

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qtrain-bitnet-bench-"))
    runs = json.loads((work / "runs.json").read_text()) if args.skip_training else train(work, args.steps, args.eval_every)
    atomic_write_json(work / "runs.json", runs)
    if args.train_only:
        return
    bit_dir = Path(runs["BitNet, lambda warmup"]["dir"])
    git = git_sha()
    result = {"benchmark": "bitnet_compare", "git": git, "steps": args.steps, "machine": machine_info(),
              "command": f"python benchmarks/bitnet_compare.py --steps {args.steps} --eval-every {args.eval_every}",
              "runs": runs, "sizes": sizes(work, bit_dir), **speeds(work, bit_dir, args.threads)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "bitnet_compare.json", result)
    render(result)


if __name__ == "__main__":
    main()
