"""Bench matrices and their runner: the rows of each matrix, one subprocess per row (clean memory figures),
each row trained under CodeCarbon and recorded as one JSON file in ``OUTPUT/rows/``; a rerun into the same
directory skips the rows that finished and retries the rest. ``python -m qtrain.bench _row SPEC OUT`` is the
row worker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import resource
import time
from pathlib import Path
from typing import Any

from qtrain.bench.energy import start_tracker, stop_tracker
from qtrain.errors import QtrainError

ROOT = Path(__file__).resolve().parents[2]  # the checkout (git sha of a measurement)
# every training row of a matrix: short, no checkpoints, a smaller validation set (figures, not a model)
BENCH_DEFAULTS = {"save_every": 0, "eval_every": 0, "val_max_sequences": 8, "warmup_steps": 1, "log_every": 1}
BUDGETS_GIB = (4, 8, 16, 24)
BUDGET_MODELS = ("HuggingFaceTB/SmolLM2-1.7B", "Qwen/Qwen2.5-Coder-1.5B", "deepseek-ai/deepseek-coder-1.3b-base",
                 "meta-llama/Llama-3.2-3B", "deepseek-ai/deepseek-coder-6.7b-base", "codellama/CodeLlama-7b-hf",
                 "Qwen/Qwen2.5-Coder-7B", "meta-llama/Llama-3.1-8B", "codellama/CodeLlama-13b-hf",
                 "bigcode/starcoderbase")


class BenchError(QtrainError, ValueError):
    pass


# ---------------------------------------------------------------------------------------------- matrices

def _methods_rows() -> list[dict]:
    rows = []
    for method, recipe in (("full", "cpu-full"), ("lora", "cpu-lora"), ("qlora", "cpu-qlora"), ("bitnet", "cpu-bitnet")):
        for gc in (False, True):
            rows.append({"name": f"{method}{'+ckpt' if gc else ''}", "recipe": f"{recipe}.yaml", "group": method,
                         "overrides": {"gradient_checkpointing": gc, "grad_accum_steps": 4}})
    return rows


# the trade-off study of small-code-LLM fine-tuning (full vs LoRA): its initial values and ranges ("Conf-6" target modules read as all linear layers)
TRADEOFF_BASE = {"method": "lora", "lora_r": 64, "lora_alpha": 128, "micro_batch_size": 2, "grad_accum_steps": 1,
                 "seq_len": 1024, "learning_rate": 5e-5, "target_modules": "all-linear", "lora_dropout": 0.05}
TRADEOFF_RANGES = {"lora_r": [8, 16, 32, 64, 128], "micro_batch_size": [1, 2, 4],
                   "seq_len": [128, 256, 512, 1024, 2048], "learning_rate": [5e-6, 1e-6, 5e-5, 5e-4],
                   "target_modules": ["attention", "language", "mlp", "all-linear"]}


def _tradeoff_rows() -> list[dict]:
    rows = [{"name": "base", "recipe": None, "group": "base", "overrides": dict(TRADEOFF_BASE)}]
    for var, values in TRADEOFF_RANGES.items():
        for v in values:
            if v == TRADEOFF_BASE[var]:
                continue
            o = {**TRADEOFF_BASE, var: v}
            if var == "lora_r":
                o["lora_alpha"] = 2 * v  # alpha/r fixed at 2, as in the base
            rows.append({"name": f"{var}={v}", "recipe": None, "group": var, "overrides": o})
    return rows


MATRICES = {"methods": _methods_rows, "tradeoff": _tradeoff_rows}


def matrix_rows(matrix: str) -> list[dict]:
    if matrix in MATRICES:
        return MATRICES[matrix]()
    path = Path(matrix)
    if not path.is_file():
        raise BenchError(f"--matrix {matrix!r} is neither a shipped matrix ({', '.join([*MATRICES, 'budget'])}) nor a "
                         "YAML file")
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise BenchError(f"{matrix}: expected a mapping with a non-empty 'rows' list of {{name, recipe, overrides}}")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not r.get("name"):
            raise BenchError(f"{matrix}: row {i} needs a 'name'")
        out.append({"name": str(r["name"]), "recipe": r.get("recipe"), "group": str(r.get("group", "custom")),
                    "overrides": dict(r.get("overrides") or {}), "export": r.get("export")})
    names = [r["name"] for r in out]
    if len(set(names)) != len(names):
        raise BenchError(f"{matrix}: row names must be unique")
    return out


def row_recipe(row: dict, steps: int):
    from qtrain.recipe import load_recipe_dict

    import yaml

    from qtrain.recipe import RecipeError, resolve_recipe_path

    values: dict[str, Any] = {}
    if row.get("recipe"):
        try:
            path = resolve_recipe_path(row["recipe"])
        except RecipeError as exc:
            raise BenchError(f"row {row['name']!r}: {exc}") from None
        values = yaml.safe_load(path.read_text()) or {}
    values = {**values, **BENCH_DEFAULTS, **row["overrides"], "max_steps": steps, "name": f"bench-{row['name']}"}
    values["warmup_steps"] = min(values.get("warmup_steps", 1), max(1, steps // 2))
    return load_recipe_dict(values, source=f"bench row {row['name']!r}")


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name)


# ---------------------------------------------------------------------------------------------- one row

def run_row(spec: dict) -> dict:
    """Train one row in this process under CodeCarbon; return its result (called in a fresh subprocess)."""
    import platform

    from qtrain.plan import model_shape, predict
    from qtrain.train import _versions, fit

    row = spec["row"]
    if row.get("no_train"):  # the untrained model, scored like the others (the quality matrix's reference)
        from qtrain.train import _versions

        return {"status": "ok", "method": "base", "steps": 0, "versions": _versions(), "platform": platform.platform(),
                "model_ref": spec.get("model"), "quality": _quality_eval(spec, spec.get("model"))}
    recipe = row_recipe(row, spec["steps"])
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    try:
        predicted = predict(model_shape(spec.get("model")), recipe, device).peak_bytes
    except Exception:  # an architecture the planner cannot read still benchmarks
        predicted = None
    tracker = start_tracker(spec.get("country", "USA"))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    summary = fit(recipe, model=spec.get("model"), data=row.get("data") or spec.get("data"), output=spec["run_dir"],
                  overwrite=True, time_limit_s=row.get("time_s"))
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    energy = stop_tracker(tracker, cpu_s) if tracker is not None else None
    result = {"status": "ok", "model_ref": spec.get("model"), "predicted_peak_bytes": predicted, "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu_s, 2),
              "recipe": recipe.to_dict(), "energy": energy, "versions": _versions(), "platform": platform.platform(),
              **{k: summary[k] for k in ("method", "steps", "train_tokens", "tokens_per_second", "mfu", "peak_memory_bytes",
                                         "train_seconds", "val_loss_before", "val_loss_after", "trainable_params",
                                         "machine", "device", "allocator")}}
    if row.get("export"):
        result["export"] = _export_row(Path(spec["run_dir"]))
    if spec.get("quality"):
        result["quality"] = _quality_eval(spec, spec["run_dir"])
    return result


def _quality_eval(spec: dict, model) -> dict:
    """The row's model on the quality matrix's held-out sets: MBPP test pass@1 (greedy) and held-out code
    perplexity; the samples stay in the row's directory for paired comparisons."""
    from qtrain.evaluate import EvalOptions, run_eval
    from qtrain.stats import wilson_interval

    q = spec["quality"]
    out = Path(spec["run_dir"]) / "eval-mbpp"
    s = run_eval(model, EvalOptions(task="mbpp", data=q["mbpp"], limit=q.get("limit")), out, say=lambda m: None)
    from qtrain.evaluate import per_problem_pass

    per_problem = per_problem_pass([json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()])
    solved = round(sum(per_problem.values()))
    return {"task": "mbpp", "problems": s["problems"], "pass@1": s["pass@1"], "solved": solved,
            "per_problem": per_problem,
            "wilson95": [round(x, 4) for x in wilson_interval(solved, s["problems"])],
            "val_perplexity": s.get("val_perplexity"), "eval_dir": str(out),
            "generation_tokens_per_second": s.get("generation_tokens_per_second")}


def _export_row(run_dir: Path) -> dict:
    """int8 ONNX export of the row's run, with its size and decode speed (its own process)."""
    out = run_dir / "onnx"
    proc = subprocess.run([sys.executable, "-m", "qtrain", "export", str(run_dir), "--onnx", "--int8", "-o", str(out),
                           "--overwrite", "--allow-degraded"], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["export failed"])[-1]}
    speed = subprocess.run([sys.executable, "-m", "qtrain.export.speed", str(out / "int8")], capture_output=True, text=True)
    if speed.returncode != 0:
        return {"error": (speed.stderr.strip().splitlines() or ["speed failed"])[-1]}
    s = json.loads(speed.stdout.strip().splitlines()[-1])
    return {"format": "onnx-int8", "bytes": s["bytes"], "decode_tokens_per_second": s["decode_tokens_per_second"]}


# ---------------------------------------------------------------------------------------------- the matrix

def _git() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"


def run_matrix(matrix: str, output: Path, steps: int, model: str | None = None, data: str | None = None,
               country: str = "USA", say=print, keep_runs: bool = False, rows: list[dict] | None = None,
               quality: dict | None = None) -> list[dict]:
    """Run every row not yet finished in ``output``; returns all rows (finished, failed) in matrix order.

    A row's run directory keeps its summary and metrics; its weights and checkpoints are deleted once the row
    is recorded (a row is a measurement, not a model: a methods matrix otherwise leaves ~8 GB), unless
    ``keep_runs``."""
    from qtrain.io import atomic_write_json

    if steps <= 0:
        raise BenchError(f"--steps {steps} must be positive")
    rows = rows if rows is not None else matrix_rows(matrix)
    for r in rows:
        if not r.get("no_train"):
            row_recipe(r, steps)  # a bad row is an error before hours of running
    rows_dir = output / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, row in enumerate(rows, 1):
        path = rows_dir / f"{_slug(row['name'])}.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("status") == "ok" and old.get("steps_requested") == steps:
                say(f"[{i}/{len(rows)}] {row['name']}: done before, kept")
                results.append(old)
                continue
        say(f"[{i}/{len(rows)}] {row['name']}: " + ("evaluating the untrained model ..." if row.get("no_train") else
                                                    f"training {row['time_s'] / 60:.0f} minutes ..." if row.get("time_s")
                                                    else f"training {steps} steps ..."))
        spec = {"row": row, "steps": steps, "model": model, "data": data, "country": country,
                "run_dir": str(output / "runs" / _slug(row["name"])), "quality": quality}
        spec_path = output / "runs" / f"{_slug(row['name'])}.spec.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(spec_path, spec)
        out_path = spec_path.with_suffix(".result.json")
        out_path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        # each row trains on the host allocator `qtrain fit` would use (jemalloc when the system has it)
        from qtrain.measure import jemalloc_exec_env

        proc = subprocess.run([sys.executable, "-m", "qtrain.bench", "_row", str(spec_path), str(out_path)],
                              capture_output=True, text=True, env=jemalloc_exec_env(dict(os.environ)) or None)
        base = {"name": row["name"], "group": row["group"], "matrix": matrix, "overrides": row["overrides"],
                "recipe_file": row.get("recipe"), "steps_requested": steps, "time_s": row.get("time_s"), "git": _git(),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if proc.returncode == 0 and out_path.is_file():
            result = {**base, **json.loads(out_path.read_text())}
            if result.get("tokens_per_second") is not None:
                say(f"    {result['tokens_per_second']:.1f} tok/s, peak {result['peak_memory_bytes'] / 2**30:.2f} GiB, "
                    f"val loss {result['val_loss_after']:.3f}"
                    + (f", {result['energy']['kwh'] * 1000:.2f} Wh ({result['energy']['label']})"
                       if result.get("energy") else ""))
            if result.get("quality"):
                q = result["quality"]
                say(f"    MBPP pass@1 {q['pass@1']:.2%} on {q['problems']} problems, held-out perplexity "
                    f"{q['val_perplexity']}")
        else:
            tail = [x for x in proc.stderr.strip().splitlines() if x.strip()][-1:] or [f"exit code {proc.returncode}"]
            result = {**base, "status": "failed", "error": tail[0][-600:],
                      "seconds": round(time.perf_counter() - t0, 1)}
            say(f"    FAILED: {result['error']}")
        atomic_write_json(path, result)
        results.append(result)
        if not keep_runs and result.get("status") == "ok":
            drop_weights(Path(spec["run_dir"]))
    return results


def drop_weights(run_dir: Path) -> None:
    """Delete the model files of a bench row's run (checkpoints, weights, exports); keep its small records."""
    if not run_dir.is_dir():
        return
    for sub in ("checkpoints", "onnx"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    for f in run_dir.iterdir():
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".gguf", ".onnx", ".onnx_data", ".pt"):
            f.unlink()


def load_rows(output: Path) -> list[dict]:
    rows_dir = Path(output) / "rows"
    if not rows_dir.is_dir():
        raise BenchError(f"{str(output)!r} holds no bench results (no rows/ directory); run `qtrain bench --matrix ...`")
    rows = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))]
    order = {r["name"]: i for i, r in enumerate(matrix_rows(rows[0]["matrix"]))} if rows and rows[0]["matrix"] in MATRICES else {}
    return sorted(rows, key=lambda r: order.get(r["name"], len(order)))


def _main() -> None:  # the row worker: python -m qtrain.bench _row SPEC OUT
    import logging
    import warnings

    from qtrain.io import atomic_write_json

    if len(sys.argv) != 4 or sys.argv[1] != "_row":
        raise SystemExit("usage: python -m qtrain.bench _row SPEC.json OUT.json (internal; use `qtrain bench`)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    spec = json.loads(Path(sys.argv[2]).read_text())
    atomic_write_json(Path(sys.argv[3]), run_row(spec))

