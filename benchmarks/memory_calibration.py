"""Predicted vs measured peak memory of training runs on this CPU, one process per variant.

For each variant (method x gradient checkpointing x sequence length x micro-batch) on the default model
and on a tiny random-init model, a fresh process runs `qtrain.train.fit` for 2 optimizer steps (the peak
is in step 2: activations + gradients + optimizer states) and records its peak RSS (ru_maxrss, the whole
process, minus nothing). The prediction comes from `qtrain.plan.predict` on the config alone.
Writes benchmarks/results/memory_calibration.{json,md}.

    python benchmarks/memory_calibration.py [--quick] [--times 3]   # each variant --times times (median + range)
    python benchmarks/memory_calibration.py --repeat lora,on,512,1 --times 3   # one default-model variant, 3 times

``--repeat`` measures the run-to-run spread of one variant (glibc's heap makes peak RSS vary between identical
runs) and writes benchmarks/results/memory_repeats.{json,md} without touching the main table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import header, git_sha  # noqa: E402 - benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SUFFIX = ""  # "_jemalloc" for --allocator jemalloc


def make_tiny_model(d: Path) -> Path:
    """A 4-layer Llama (hidden 256) with the default model's tokenizer: real vocabulary, tiny body."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtrain.models import load_tokenizer, resolve_model_source

    tok = load_tokenizer(resolve_model_source(None))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def worker(spec: dict, out: Path) -> None:
    import psutil

    import torch  # noqa: F401  (imports are part of the process baseline being measured)

    rss_imports = psutil.Process().memory_info().rss
    from qtrain.plan import model_shape, predict
    from qtrain.recipe import load_recipe
    from qtrain.train import fit

    recipe = load_recipe(None, [f"method={spec['method']}", f"gradient_checkpointing={spec['gc']}",
                                f"seq_len={spec['seq']}", f"micro_batch_size={spec['mb']}",
                                f"grad_accum_steps={spec.get('accum', 1)}", f"dtype={spec.get('dtype', 'float32')}",
                                "max_steps=2", "save_every=0", "warmup_steps=1", "val_max_sequences=2"])
    pred = predict(model_shape(spec["model"]), recipe, "cpu")
    with tempfile.TemporaryDirectory() as d:
        s = fit(recipe, model=spec["model"], output=Path(d) / "run")
    from qtrain.measure import heap_allocator

    out.write_text(json.dumps({**spec, "measured_peak_bytes": s["peak_memory_bytes"], "rss_after_imports": rss_imports,
                               "allocator": heap_allocator(),
                               "predicted_peak_bytes": pred.peak_bytes, "terms": pred.terms,
                               "tokens_per_second": s["tokens_per_second"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--repredict", action="store_true", help="recompute the predictions of the saved measurements")
    ap.add_argument("--fit-runtime", action="store_true",
                    help="with --allocator jemalloc: the runtime constant (plan.HOST_HEAP) refitted on the saved runs")
    ap.add_argument("--repeat", metavar="METHOD,CKPT,SEQ,MB[,ACCUM]",
                    help="one default-model variant, e.g. lora,on,512,1 (gradient accumulation 1 unless given)")
    ap.add_argument("--times", type=int, default=3)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="--repeat: the recipe's compute dtype (bfloat16: autocast over fp32 masters)")
    ap.add_argument("--allocator", choices=("glibc", "jemalloc"), default="glibc",
                    help="jemalloc: every worker runs with the system libjemalloc preloaded (results *_jemalloc.*)")
    ap.add_argument("--worker")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker), Path(args.out))
        return
    global SUFFIX
    SUFFIX = "" if args.allocator == "glibc" else f"_{args.allocator}"
    if args.allocator == "jemalloc":
        from qtrain.measure import find_jemalloc, jemalloc_preload_env

        lib = find_jemalloc()
        if lib is None:
            raise SystemExit("--allocator jemalloc: no libjemalloc.so.2 found; apt install libjemalloc2")
        os.environ.update(jemalloc_preload_env(lib, os.environ))  # inherited by the worker processes
    if args.repredict or args.fit_runtime:
        result = repredict(json.loads((RESULTS / f"memory_calibration{SUFFIX}.json").read_text()))
        if args.fit_runtime:
            median, bar, implied = fitted_runtime(result)
            print(f"runtime that centres each variant (MiB): {', '.join(f'{x:.0f}' for x in implied)}; "
                  f"median {median:.0f}; none under by more than 3% against its highest run: {bar:.1f}")
            return
        render(result)
        return
    if args.repeat:
        repeat(args.repeat, args.times, args.dtype)
        return
    rows = []
    git = git_sha()  # the code that measured, before any edit made while it runs
    with tempfile.TemporaryDirectory() as d:
        tiny = str(make_tiny_model(Path(d) / "tiny-llama"))
        variants = []
        for method, gc, (seq, mb) in itertools.product(("full", "lora", "qlora"), (False, True), ((256, 4), (512, 1))):
            variants.append({"model": tiny, "label": "tiny-llama (4L, h256)", "method": method, "gc": gc, "seq": seq, "mb": mb})
        if not args.quick:
            for method, gc, (seq, mb) in itertools.product(("full", "lora", "qlora"), (False, True),
                                                          ((256, 4), (512, 1))):
                variants.append({"model": None, "label": "SmolLM2-135M", "method": method, "gc": gc, "seq": seq, "mb": mb})
        # round-robin over the variants, so a slow spell of this shared machine does not land on one variant
        runs = [[measure(spec) for spec in variants] for _ in range(args.times)]
        rows = [combine([rs[i] for rs in runs]) for i in range(len(variants))]
    for r in rows:
        if r.get("model") and "tiny" in r["label"]:
            r["model"] = "tiny-llama"

    command = ("python benchmarks/memory_calibration.py" + (" --quick" if args.quick else "")
               + (f" --times {args.times}" if args.times != 3 else "")
               + (f" --allocator {args.allocator}" if SUFFIX else ""))
    result = header("memory_calibration", git=git, rows=rows, command=command, allocator=args.allocator)
    render(result)


def measure(spec: dict) -> dict:
    """One variant in a fresh process: its row, or the spec with the error."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    t = time.time()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec), "--out", str(out)],
                          capture_output=True, text=True)
    name = f"{spec['label']} {spec['method']} gc={spec['gc']} seq={spec['seq']} mb={spec['mb']}"
    if proc.returncode != 0 or not out.read_text():
        print(f"{name}: FAILED {proc.stderr[-500:]}", file=sys.stderr)
        return {**spec, "error": proc.stderr[-1500:]}
    row = json.loads(out.read_text())
    out.unlink()
    score(row)
    print(f"{name}: predicted {row['predicted_peak_bytes'] / 2**30:.3f} GiB, measured "
          f"{row['measured_peak_bytes'] / 2**30:.3f} GiB ({row['error_pct']:+.1f}%) [{time.time() - t:.0f} s]",
          file=sys.stderr)
    return row


def combine(runs: list[dict]) -> dict:
    """The identical runs of one variant as one row: the median peak is the measurement, all runs are kept."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    row = dict(sorted(ok, key=lambda r: r["measured_peak_bytes"])[(len(ok) - 1) // 2])
    row["runs_peak_bytes"] = [r["measured_peak_bytes"] for r in ok]
    row["failed_runs"] = len(runs) - len(ok)
    return score(row)


def score(row: dict) -> dict:
    """Errors of the prediction against the median run and against each run (positive: over-predicted)."""
    pred, runs = row["predicted_peak_bytes"], row.get("runs_peak_bytes") or [row["measured_peak_bytes"]]
    row["error_pct"] = round(100 * (pred / row["measured_peak_bytes"] - 1), 1)
    row["error_pct_runs"] = [round(100 * (pred / m - 1), 1) for m in runs]
    return row


def repeat(variant: str, times: int, dtype: str = "float32") -> None:
    from qtrain.io import atomic_write_json, atomic_write_text
    from qtrain.measure import machine_info

    try:
        method, gc, seq, mb, *accum = variant.split(",")
        spec = {"model": None, "label": "SmolLM2-135M", "method": method, "gc": gc in ("on", "true", "1"),
                "seq": int(seq), "mb": int(mb), "accum": int(accum[0]) if accum else 1, "dtype": dtype}
        if len(accum) > 1:
            raise ValueError
    except ValueError:
        raise SystemExit(f"--repeat {variant!r}: expected METHOD,CKPT,SEQ,MB[,ACCUM] such as lora,on,512,1")
    rows = [measure(spec) for _ in range(times)]
    path = RESULTS / f"memory_repeats{SUFFIX}.json"
    result = json.loads(path.read_text()) if path.is_file() else {"benchmark": "memory_repeats", "variants": {}}
    result["machine"] = machine_info()
    key = variant if dtype == "float32" else f"{variant} {dtype}"
    result["variants"][key] = {"git": git_sha(), "command": f"python benchmarks/memory_calibration.py --repeat "
                               f"{variant} --times {times}" + (f" --allocator {SUFFIX[1:]}" if SUFFIX else "")
                               + (f" --dtype {dtype}" if dtype != "float32" else ""),
                               "rows": rows}
    atomic_write_json(path, result)
    alloc = f", {SUFFIX[1:]} preloaded" if SUFFIX else ", glibc's allocator"
    lines = [f"# Run-to-run spread of peak RSS (identical runs, each in a fresh process{alloc})", "",
             f"Machine: {result['machine']['cpu']} ({result['machine']['cores']} cores).", "",
             "| variant (default model) | git | predicted (GiB) | measured, each run (GiB) | spread |", "|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        ok = [r for r in v["rows"] if "error" not in r]
        if not ok:
            continue
        meas = [r["measured_peak_bytes"] / 2**30 for r in ok]
        lines.append(f"| {name} | {v['git']} | {ok[0]['predicted_peak_bytes'] / 2**30:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in meas)} | {100 * (max(meas) / min(meas) - 1):.1f}% |")
    atomic_write_text(RESULTS / f"memory_repeats{SUFFIX}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


TINY_CONFIG = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 256, "intermediate_size": 768,
               "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


def repredict(result: dict) -> dict:
    """The same measurements against the current planner (predictions need only configs, not a rerun)."""
    from qtrain.plan import model_shape, predict
    from qtrain.recipe import load_recipe
    from qtrain.shapes import shape_from_config

    for r in result["rows"]:
        if "error" in r:
            continue
        shape = shape_from_config(TINY_CONFIG, "tiny-llama") if r["model"] == "tiny-llama" else model_shape(None)
        recipe = load_recipe(None, [f"method={r['method']}", f"gradient_checkpointing={r['gc']}", f"seq_len={r['seq']}",
                                    f"micro_batch_size={r['mb']}", f"grad_accum_steps={r.get('accum', 1)}"])
        pred = predict(shape, recipe, "cpu", allocator=result.get("allocator", "glibc"))
        r["predicted_peak_bytes"], r["terms"] = pred.peak_bytes, pred.terms
        score(r)
    result["git_predicted"] = git_sha()
    return result


def fitted_runtime(result: dict, under_bar: float = 0.03) -> tuple[float, float, list[float]]:
    """The jemalloc runtime constant (plan.HOST_HEAP) refitted on saved runs, in MiB. Every phase of the peak
    counts the runtime once, so a prediction moves one for one with it. Returns the runtime that centres the
    median variant (each variant's implied runtime: the one that makes its prediction equal its median run),
    the smallest runtime with which no variant is under-predicted by more than ``under_bar`` against its highest
    run (the planner's constant: under-prediction is the error that crashes a run), and the implied runtimes.
    Needs predictions from the current planner (repredict)."""
    from qtrain.plan import HOST_HEAP

    now = HOST_HEAP["jemalloc"][0]
    rows = [r for r in result["rows"] if "error" not in r]
    implied = [(now + r["measured_peak_bytes"] - r["predicted_peak_bytes"]) / 2**20 for r in rows]
    floor = max((1 - under_bar) * max(r["runs_peak_bytes"]) - r["predicted_peak_bytes"] for r in rows)
    return statistics.median(implied), (now + floor) / 2**20, implied


def render(result: dict) -> None:
    from qtrain.io import atomic_write_json, atomic_write_text

    rows = result["rows"]
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        r.setdefault("error_pct_runs", [r["error_pct"]])
    result["within_10pct"] = sum(abs(r["error_pct"]) <= 10 for r in ok)
    # the crash-relevant count is judged against the highest run of each variant, not the median
    result["under_by_more_than_5pct"] = sum(min(r["error_pct_runs"]) < -5 for r in ok)
    result["runs"] = sum(len(r["error_pct_runs"]) for r in ok)
    result["runs_within_10pct"] = sum(abs(e) <= 10 for r in ok for e in r["error_pct_runs"])
    result["variants"] = len(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"memory_calibration{SUFFIX}.json", result)
    m, git = result["machine"], result["git"]
    pred_note = (f" Predictions from the planner at git {result['git_predicted']} (`--repredict`: the measurements "
                 "are unchanged, predictions need only configs)." if result.get("git_predicted") else "")
    alloc = " with jemalloc preloaded" if result.get("allocator", "glibc") != "glibc" else ""
    lines = [f"# Predicted vs measured peak memory (CPU{alloc}, peak RSS of the whole process, 2 optimizer steps)", "",
             f"Machine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}; measured at git {git}. Reproduce: "
             f"`{result['command']}`.{pred_note} "
             f"Each variant ran {max(len(r['error_pct_runs']) for r in ok)} times, each in a fresh process; "
             "measured is the median run, and the error range is the prediction's error against each run. "
             f"{result['within_10pct']} of {len(ok)} variants within +-10% of the median "
             f"({result['runs_within_10pct']} of {result['runs']} single runs); {result['under_by_more_than_5pct']} "
             "under-predicted by more than 5% against their highest run.", "",
             "| model | method | checkpointing | seq | micro-batch | predicted (GiB) | measured, median (GiB) | "
             "runs (GiB) | error vs median | error range over runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['method']} | {r['gc']} | {r['seq']} | {r['mb']} | failed | | | | |")
        else:
            runs = r.get("runs_peak_bytes") or [r["measured_peak_bytes"]]
            errs = r["error_pct_runs"]
            lines.append(f"| {r['label']} | {r['method']} | {'on' if r['gc'] else 'off'} | {r['seq']} | {r['mb']} | "
                         f"{r['predicted_peak_bytes'] / 2**30:.3f} | {r['measured_peak_bytes'] / 2**30:.3f} | "
                         f"{', '.join(f'{x / 2**30:.3f}' for x in runs)} | {r['error_pct']:+.1f}% | "
                         f"{min(errs):+.1f}% to {max(errs):+.1f}% |")
    atomic_write_text(RESULTS / f"memory_calibration{SUFFIX}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
