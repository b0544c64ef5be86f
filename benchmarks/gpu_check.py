"""The planner's CUDA terms against one GPU, in one go: ``python benchmarks/gpu_check.py`` (about 8 minutes).

For 1B-8B model shapes from the shipped offline configs (no download: each model is built with random weights on
the GPU and written once to a scratch directory, with the embedded model's tokenizer), it trains full
fine-tuning, LoRA and QLoRA, with and without gradient checkpointing, for a few steps each through
``qtrain plan --measure``'s path (a fresh ``qtrain fit`` process per row), and writes predicted against measured
peak memory and tokens/s to benchmarks/results/gpu_check.{json,md}.

Rows run in a fixed priority order (every method on the smallest model first, then the largest, then the rest)
until the time budget would be overrun; rows the planner predicts beyond the device's memory are listed as
skipped, not run. Measured: torch's peak allocated and reserved bytes and the device memory in use at the end
(context included); the planner's figure includes a CUDA context and a fragmentation allowance, so it is compared
with the device figure, and its body (without ``runtime_overhead``) with peak allocated.

``--dry-run`` runs the same pipeline on a CPU with each family scaled down to a few layers (what the tests run).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, write_results  # noqa: E402

MODELS = {"1B": "meta-llama/Llama-3.2-1B", "1.5B": "Qwen/Qwen2.5-Coder-1.5B", "3B": "meta-llama/Llama-3.2-3B",
          "8B": "meta-llama/Llama-3.1-8B"}
# (model, method, gradient checkpointing), most informative first: all six settings on one shape, then the
# largest shape where only the adapters fit, then other shapes (tied embeddings, another vocabulary)
ROWS = [("1B", m, c) for c in (True, False) for m in ("full", "lora", "qlora")] + [
    ("8B", "qlora", True), ("8B", "lora", True), ("3B", "full", True), ("3B", "lora", False),
    ("3B", "qlora", True), ("1.5B", "lora", True), ("1.5B", "full", True), ("8B", "qlora", False),
    ("8B", "lora", False), ("3B", "full", False), ("1.5B", "qlora", False)]
SEQ_LEN, MICRO_BATCH = 1024, 2
DEFAULT_ROW_SECONDS = 60.0  # the time guess for a model's first row (load, a few steps, validation)


def scaled_down(config: dict, tokenizer_size: int) -> dict:
    """The family's config at a few layers and a small width (for --dry-run on a CPU), keeping what the
    planner's terms depend on structurally: GQA (kv heads below heads), MLP ratio, tied or untied embeddings."""
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    small_heads = 4
    small_kv = 2 if kv < heads else 4
    ratio = config["intermediate_size"] / config["hidden_size"]
    return {**config, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": small_heads,
            "num_key_value_heads": small_kv, "intermediate_size": int(64 * ratio) // 8 * 8,
            "vocab_size": tokenizer_size, "max_position_embeddings": 2048}


def build_model_dir(name: str, config: dict, out: Path, device: str) -> float:
    """A model directory for ``config`` with random weights (transformers' own init) and the embedded model's
    tokenizer; returns the seconds it took. Built on ``device`` in bf16 on a GPU (fp32 on a CPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtrain.models import load_tokenizer, resolve_model_source

    t0 = time.perf_counter()
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if not k.startswith("_")})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(resolve_model_source(None)).save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def row_recipe(method: str, checkpointing: bool, device: str, seq_len: int, micro_batch: int):
    from qtrain.plan import METHOD_DEFAULTS
    from qtrain.recipe import load_recipe

    overrides = [f"method={method}", f"gradient_checkpointing={str(checkpointing).lower()}", f"seq_len={seq_len}",
                 f"micro_batch_size={micro_batch}", "grad_accum_steps=1", "optimizer=adamw",
                 f"dtype={'bfloat16' if device == 'cuda' else 'float32'}",
                 f"learning_rate={METHOD_DEFAULTS[method]['learning_rate']}"]
    return load_recipe(None, overrides)


def run_rows(rows, device: str, work: Path, steps: int, minutes: float, dry: bool, say=print) -> tuple[list, dict]:
    from qtrain.calibrate import MeasureError, measure_candidate
    from qtrain.plan import Candidate, model_shape, predict
    from qtrain.shapes import lookup_known, shape_from_config

    memory = None
    if device == "cuda":
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory
    seq_len, micro_batch = (64, 1) if dry else (SEQ_LEN, MICRO_BATCH)
    deadline = time.perf_counter() + minutes * 60
    built: dict[str, Path] = {}
    build_seconds: dict[str, float] = {}
    last_row_seconds: dict[str, float] = {}
    out = []
    for key, method, ckpt in rows:
        hub_id = MODELS[key]
        config = lookup_known(hub_id)
        name = config.pop("_name")
        if dry:
            from qtrain.models import load_tokenizer, resolve_model_source

            config = scaled_down(config, len(load_tokenizer(resolve_model_source(None))))
        recipe = row_recipe(method, ckpt, device, seq_len, micro_batch)
        shape = shape_from_config(config, name) if dry else model_shape(hub_id)
        pred = predict(shape, recipe, device)
        row = {"model": name, "shape": "scaled down (dry run)" if dry else "full size", "method": method,
               "gradient_checkpointing": ckpt, "seq_len": seq_len, "micro_batch_size": micro_batch,
               "predicted_peak_bytes": pred.peak_bytes,
               "predicted_body_bytes": pred.peak_bytes - pred.terms.get("runtime_overhead", 0),
               "predicted_tokens_per_second": round(pred.tokens_per_second, 1), "terms": pred.terms}
        if memory is not None and pred.peak_bytes > memory:
            out.append({**row, "status": f"skipped: predicted {pred.peak_bytes / 2**30:.1f} GiB > the device's "
                                         f"{memory / 2**30:.1f} GiB"})
            continue
        guess = last_row_seconds.get(key, DEFAULT_ROW_SECONDS) + (0 if key in built else 30)
        if time.perf_counter() + guess > deadline:
            out.append({**row, "status": "not run: time budget"})
            continue
        if key not in built:
            say(f"building {name} ({'scaled down, ' if dry else ''}random weights) ...")
            built[key] = work / key
            build_seconds[key] = round(build_model_dir(name, config, built[key], device), 1)
        say(f"{name}: {method}{' + checkpointing' if ckpt else ''}, seq {seq_len} x {micro_batch}, {steps} steps")
        t0 = time.perf_counter()
        try:
            got = measure_candidate(Candidate(recipe, pred, True), str(built[key]), None, steps)
            status = "ok"
        except MeasureError as exc:
            got, status = {}, f"failed: {exc}"
        last_row_seconds[key] = time.perf_counter() - t0
        cuda = got.get("cuda_memory") or {}
        out.append({**row, "status": status, "seconds": round(last_row_seconds[key], 1),
                    "measured_peak_bytes": got.get("measured_peak_bytes"),
                    "measured_tokens_per_second": got.get("measured_tokens_per_second"),
                    "backoffs": got.get("backoffs"), "cuda_memory": cuda or None,
                    # the planner's whole figure against what the device had in use; its body against allocated
                    "error_vs_device": (round(pred.peak_bytes / cuda["device_used_bytes"] - 1, 4)
                                        if cuda.get("device_used_bytes") else None),
                    "error_body_vs_allocated": (round(row["predicted_body_bytes"] / cuda["max_allocated_bytes"] - 1, 4)
                                                if cuda.get("max_allocated_bytes") else None),
                    "error_vs_measured_peak": (round(pred.peak_bytes / got["measured_peak_bytes"] - 1, 4)
                                               if got.get("measured_peak_bytes") else None)})
    return out, build_seconds


def render(result: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f}" if b else "-"  # noqa: E731
    pct = lambda x: f"{x:+.1%}" if x is not None else "-"  # noqa: E731
    lines = [f"# Planner against {'a CPU (dry run, scaled-down shapes)' if result['dry_run'] else 'one GPU'}", "",
             f"Machine: {result['machine'].get('cpu', '?')}"
             f"{'; GPU ' + result['gpu'] if result.get('gpu') else ''}; git {result['git']}. Reproduce: "
             f"`{result['command']}`. Each row is a fresh `qtrain fit` process, {result['steps']} steps, random "
             "weights of the named shape. Error = predicted / measured - 1 (negative: the planner said too little).",
             "", "| model | method | ckpt | seq x batch | predicted (GiB) | measured peak (GiB) | allocated / reserved "
             "/ device used (GiB) | error vs peak | error vs device | body vs allocated | tok/s pred / meas | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        c = r.get("cuda_memory") or {}
        lines.append(
            f"| {r['model']} | {r['method']} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
            f"{r['seq_len']} x {r['micro_batch_size']} | {gib(r['predicted_peak_bytes'])} | "
            f"{gib(r.get('measured_peak_bytes'))} | "
            f"{gib(c.get('max_allocated_bytes'))} / {gib(c.get('max_reserved_bytes'))} / {gib(c.get('device_used_bytes'))} | "
            f"{pct(r.get('error_vs_measured_peak'))} | {pct(r.get('error_vs_device'))} | "
            f"{pct(r.get('error_body_vs_allocated'))} | {r['predicted_tokens_per_second']:.0f} / "
            f"{r['measured_tokens_per_second'] or 0:.0f} | {r['status']} |" if r.get("measured_peak_bytes") else
            f"| {r['model']} | {r['method']} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
            f"{r['seq_len']} x {r['micro_batch_size']} | {gib(r['predicted_peak_bytes'])} | - | - | - | - | - | "
            f"{r['predicted_tokens_per_second']:.0f} / - | {r['status']} |")
    ran = [r for r in result["rows"] if r.get("error_vs_measured_peak") is not None]
    if ran:
        errs = [r["error_vs_measured_peak"] for r in ran]
        lines += ["", f"{len(ran)} rows measured; error against the measured peak from {min(errs):+.1%} to "
                      f"{max(errs):+.1%}; {sum(e < 0 for e in errs)} under-predicted."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="on a CPU, scaled-down shapes (what the tests run)")
    ap.add_argument("--minutes", type=float, default=7.5, help="time budget for everything (default 7.5)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per row (default 4)")
    ap.add_argument("--limit", type=int, help="run only the first N rows of the priority order")
    ap.add_argument("--work", help="scratch directory for the model files (default: a temporary one, removed)")
    ap.add_argument("--results", default=str(RESULTS), help="where gpu_check.{json,md} go")
    args = ap.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU, or pass --dry-run to check the pipeline on a CPU",
              file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    rows = ROWS[: args.limit] if args.limit else ROWS
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qtrain-gpu-check-"))
    t0 = time.perf_counter()
    try:
        measured, build_seconds = run_rows(rows, device, work, args.steps, args.minutes, args.dry_run)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/gpu_check.py" + (" --dry-run" if args.dry_run else "") + \
        (f" --limit {args.limit}" if args.limit else "") + f" --steps {args.steps} --minutes {args.minutes:g}"
    result = header("gpu_check", command=command, dry_run=args.dry_run, steps=args.steps,
                    gpu=torch.cuda.get_device_name(0) if device == "cuda" else None,
                    seconds=round(time.perf_counter() - t0, 1), build_seconds=build_seconds, rows=measured)
    name = "gpu_check_dry" if args.dry_run else "gpu_check"
    write_results(name, result, render(result), Path(args.results))
    print(render(result))
    return 0 if all(not r["status"].startswith("failed") for r in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
