"""``qtrain bench``: run a matrix of recipes, one subprocess per row, and turn the results into tables and plots.

A row is a recipe (a shipped YAML plus ``key=value`` overrides) trained for a few steps in its own process (clean
memory figures), with CodeCarbon's offline tracker around the whole run. Each finished row is one JSON file in
``OUTPUT/rows/`` (git sha, package versions, machine, recipe, figures); a row that failed is kept with its error.
Running the same matrix again into the same directory skips the rows that finished and retries the rest.

Matrices: ``methods`` (full / LoRA / QLoRA / BitNet x gradient checkpointing), ``tradeoff`` (a full-vs-LoRA trade-off study's variables: LoRA
rank, batch size, sequence length, learning rate and target modules, one varied at a time from its initial values),
``budget`` (what the planner picks in 4 / 8 / 16 / 24 GB for a list of models on CUDA: no training), or a YAML file
``{rows: [{name, recipe, overrides: {key: value}}]}``.

Energy: CodeCarbon measures with RAPL where the kernel exposes it; otherwise it *estimates* CPU power from the
CPU's TDP (scaled by this process's CPU load) and RAM power from a constant. The mode is recorded per row and the
report labels estimates; a sanity check recomputes the CPU energy as CPU seconds x (TDP / cores).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qtrain.errors import QtrainError

ROOT = Path(__file__).resolve().parent.parent  # the checkout (git sha of a measurement)
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

def energy_mode(tracker) -> dict:
    """How CodeCarbon got its CPU figure: measured (RAPL, powermetrics) or estimated (TDP x load, constant)."""
    out = {"cpu_mode": None, "tdp_w": None, "measured": False}
    for h in getattr(tracker, "_hardware", []):
        if type(h).__name__ == "CPU":
            mode = getattr(h, "_mode", None)
            out["cpu_mode"] = mode
            out["tdp_w"] = getattr(h, "_tdp", None)
            out["measured"] = mode in ("intel_rapl", "apple_powermetrics", "intel_power_gadget")
        if type(h).__name__ == "GPU":
            out["gpu"] = "pynvml (measured)"
    out["label"] = ("measured (" + str(out["cpu_mode"]) + ")" if out["measured"] else
                    f"ESTIMATE: {out['cpu_mode']} (TDP {out['tdp_w']} W x CPU load)" if out["cpu_mode"] == "cpu_load" else
                    f"ESTIMATE: {out['cpu_mode']}")
    return out


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
    tracker = None
    try:
        from codecarbon import OfflineEmissionsTracker

        tracker = OfflineEmissionsTracker(country_iso_code=spec.get("country", "USA"), log_level="error",
                                          save_to_file=False, measure_power_secs=5, tracking_mode="process")
        tracker.start()
    except ImportError:
        pass
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    summary = fit(recipe, model=spec.get("model"), data=row.get("data") or spec.get("data"), output=spec["run_dir"],
                  overwrite=True, time_limit_s=row.get("time_s"))
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    energy = None
    if tracker is not None:
        co2 = tracker.stop()
        d = tracker.final_emissions_data
        mode = energy_mode(tracker)
        cores = d.cpu_count or os.cpu_count()
        expected = (cpu_s * mode["tdp_w"] / cores / 3.6e6) if mode["tdp_w"] else None
        energy = {"kwh": d.energy_consumed, "cpu_kwh": d.cpu_energy, "ram_kwh": d.ram_energy, "gpu_kwh": d.gpu_energy,
                  "co2_kg": co2, "country": d.country_name, "duration_s": d.duration, "cpu_power_w": d.cpu_power,
                  "ram_power_w": d.ram_power, "cpu_count": cores, **mode,
                  "sanity": {"cpu_seconds": round(cpu_s, 2), "tdp_per_core_w": (mode["tdp_w"] / cores) if mode["tdp_w"] else None,
                             "expected_cpu_kwh": expected,
                             "ratio": (d.cpu_energy / expected) if expected else None}}
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


# ---------------------------------------------------------------------------------------------- budget matrix

def budget_table(models=BUDGET_MODELS, budgets=BUDGETS_GIB, device: str = "cuda", base=None) -> list[dict]:
    """What the planner picks for each model and budget (no training): the planner's answer as data."""
    from qtrain.plan import BudgetError, model_shape, plan_for
    from qtrain.recipe import Recipe

    base = base or Recipe(seq_len=2048, micro_batch_size=1, grad_accum_steps=8)
    out = []
    for m in models:
        shape = model_shape(m)
        for b in budgets:
            row = {"model": m, "params_b": round(shape.total_params() / 1e9, 2), "budget_gib": b}
            try:
                p = plan_for(m, f"{b}GB", device, base)
                c = p.chosen.recipe
                row.update(method=c.method, gradient_checkpointing=c.gradient_checkpointing, seq_len=c.seq_len,
                           micro_batch_size=c.micro_batch_size, optimizer=c.optimizer,
                           predicted_peak_bytes=p.chosen.prediction.peak_bytes,
                           predicted_tokens_per_second=round(p.chosen.prediction.tokens_per_second, 1))
            except BudgetError as exc:
                need = exc.needed_bytes
                row.update(method=None, needs=f"{math.ceil(need / 2**30 * 10) / 10:g}GB" if need else "?")
            out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- reports

def _gib(x) -> str:
    return f"{x / 2**30:.2f}" if x else "-"


def render_report(rows: list[dict], output: Path, title: str, command: str) -> str:
    """Markdown tables (written to OUTPUT/report.md) and PNG plots beside it."""
    from qtrain.io import atomic_write_text

    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    m = ok[0]["machine"] if ok else {}
    lines = [f"# {title}", "", f"Machine: {m.get('cpu', '?')} ({m.get('cores', '?')} cores{', ' + m['gpu'] if m.get('gpu') else ''}), "
             f"torch {m.get('torch', '?')}; git {ok[0]['git'] if ok else '?'}; {ok[0]['steps'] if ok else '?'} steps per row. "
             f"Reproduce: `{command}`.", ""]
    modes = sorted({r["energy"]["label"] for r in ok if r.get("energy")})
    if modes:
        lines += [f"Energy: CodeCarbon offline tracker around each whole run (load, validation, training), "
                  f"process mode; CPU figure: {'; '.join(modes)}. CO2 for {ok[0]['energy']['country']}'s grid mix.", ""]
    lines += ["| row | method | ckpt | seq | batch | peak (GiB) | predicted (GiB) | tok/s | MFU | val loss | energy (Wh) | "
              "Wh per M tokens | CO2 (g) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        rc, e = r["recipe"], r.get("energy") or {}
        wh = e.get("kwh", 0) * 1000
        lines.append(f"| {r['name']} | {r['method']} | {'yes' if rc['gradient_checkpointing'] else 'no'} | {rc['seq_len']} | "
                     f"{rc['micro_batch_size']}x{rc['grad_accum_steps']} | {_gib(r['peak_memory_bytes'])} | "
                     f"{_gib(r.get('predicted_peak_bytes'))} | {r['tokens_per_second']:.1f} | {r['mfu']:.1%} | "
                     f"{r['val_loss_after']:.3f} | {wh:.2f} | {wh / (r['train_tokens'] / 1e6):.1f} | "
                     f"{e.get('co2_kg', 0) * 1000:.2f} |")
    for r in failed:
        lines.append(f"| {r['name']} | FAILED: {r.get('error', '')[:150]} | | | | | | | | | | | |")
    exports = [r for r in ok if r.get("export")]
    if exports:
        lines += ["", "| row | export | size (MB) | decode tok/s |", "|---|---|---|---|"]
        for r in exports:
            x = r["export"]
            lines.append(f"| {r['name']} | {x.get('format', 'error: ' + x.get('error', ''))} | "
                         f"{x.get('bytes', 0) / 1e6:.1f} | {x.get('decode_tokens_per_second', '-')} |")
    notes = []
    if len({r["recipe"]["seq_len"] for r in ok}) > 1:
        notes.append("Validation loss is measured on sequences of each row's own length (more context, lower loss): "
                     "rows that differ in sequence length are not comparable on it.")
    same_work: dict[str, list[float]] = {}  # rows that differ only in learning rate do the same computation
    for r in ok:
        key = json.dumps({k: v for k, v in r["recipe"].items() if k not in ("learning_rate", "seed", "name")}, sort_keys=True)
        same_work.setdefault(key, []).append(r["tokens_per_second"])
    spread = max(same_work.values(), key=len, default=[])
    if len(spread) >= 3:
        notes.append(f"Run-to-run noise: {len(spread)} rows that differ only in learning rate (the same computation) "
                     f"trained at {min(spread):.1f}-{max(spread):.1f} tokens/s ({100 * (max(spread) / min(spread) - 1):.0f}% "
                     "apart); smaller throughput differences than that are not findings.")
    if notes:
        lines += [""] + notes
    san = [r for r in ok if (r.get("energy") or {}).get("sanity", {}).get("ratio")]
    if san:
        ratios = [r["energy"]["sanity"]["ratio"] for r in san]
        e0 = san[0]["energy"]
        lines += ["", f"Sanity check of the estimate: CPU energy recomputed as this process's CPU seconds x "
                  f"{e0['sanity']['tdp_per_core_w']:.1f} W (CodeCarbon's TDP {e0['tdp_w']} W / {e0['cpu_count']} cores) "
                  f"agrees with CodeCarbon's CPU energy within a ratio of {min(ratios):.2f}-{max(ratios):.2f} over "
                  f"{len(san)} rows; RAM energy is CodeCarbon's constant {e0['ram_power_w']:.0f} W x duration."]
    pngs = plot_rows(ok, output)
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    text = "\n".join(lines) + "\n"
    atomic_write_text(output / "report.md", text)
    if ok:
        atomic_write_text(output / "summary.md", render_cost_summary(ok, title, command))
    return text


def render_cost_summary(rows: list[dict], title: str, command: str) -> str:
    """What each row costs, in the few numbers a user picks a recipe by (for the README)."""
    m = rows[0].get("machine") or {}
    lines = [f"# {title}: what each recipe costs on {m.get('cpu', '?')} ({m.get('cores', '?')} cores), default model, "
             f"git {rows[0].get('git', '?')} (`{command}`)", "",
             "| recipe | peak memory (GiB) | tokens/s | energy (Wh per million tokens) |", "|---|---|---|---|"]
    for r in rows:
        e = r.get("energy") or {}
        wh = f"{e['kwh'] * 1000 / (r['train_tokens'] / 1e6):.0f}" if e.get("kwh") else "-"
        lines.append(f"| {r['name']} | {_gib(r['peak_memory_bytes'])} | {r['tokens_per_second']:.0f} | {wh} |")
    return "\n".join(lines) + "\n"


def _label(ax, points: list[tuple[str, float, float]]) -> None:
    """Name each point, moving a label down a line where it would overprint one already placed."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the limits, so data -> pixel is final
    placed: list[tuple[float, float]] = []
    for name, x, y in sorted(points, key=lambda p: -p[2]):
        px, py = ax.transData.transform((x, y))
        dy = 3.0
        while any(abs(px - qx) < 70 and abs(py + dy - qy) < 9 for qx, qy in placed):
            dy -= 9.0
        placed.append((px, py + dy))
        ax.annotate(name, (x, y), fontsize=7, xytext=(4, dy), textcoords="offset points")


def plot_rows(rows: list[dict], output: Path) -> list[Path]:
    if not rows:
        return []
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # 1. memory vs throughput, with budget lines
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in rows:
        ax.scatter(r["tokens_per_second"], r["peak_memory_bytes"] / 2**30, s=40)
    top = max(r["peak_memory_bytes"] for r in rows) / 2**30
    ax.set_xlim(left=0, right=max(r["tokens_per_second"] for r in rows) * 1.25)
    ax.set_ylim(bottom=0, top=max(top * 1.15, min(b for b in (2, 4, 8, 16, 24, 48, 80) if b > top) * 1.05))
    for b in (2, 4, 8, 16, 24, 48, 80):
        if b <= ax.get_ylim()[1]:
            ax.axhline(b, color="grey", lw=0.8, ls="--")
            ax.text(ax.get_xlim()[0], b, f" {b} GB budget", va="bottom", fontsize=7, color="grey")
    _label(ax, [(r["name"], r["tokens_per_second"], r["peak_memory_bytes"] / 2**30) for r in rows])
    ax.set_xlabel("training throughput (tokens/s)")
    ax.set_ylabel("measured peak memory (GiB)")
    ax.set_title("Peak memory vs throughput per recipe")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    made.append(_save(fig, output / "memory_vs_throughput.png"))
    energy = [r for r in rows if r.get("energy")]
    if energy:
        # 2. energy per million training tokens
        fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(energy) + 1.5))
        vals = [r["energy"]["kwh"] * 1000 / (r["train_tokens"] / 1e6) for r in energy]
        ax.barh([r["name"] for r in energy], vals, color="#4c72b0")
        ax.invert_yaxis()
        est = "" if energy[0]["energy"]["measured"] else " (CodeCarbon estimate: TDP x CPU load)"
        ax.set_xlabel(f"energy per million training tokens (Wh){est}")
        ax.set_title("Energy per million training tokens (whole run incl. load and validation)")
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        made.append(_save(fig, output / "energy_per_mtok.png"))
        # 3. validation loss vs energy
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for r in energy:
            ax.scatter(r["energy"]["kwh"] * 1000, r["val_loss_after"], s=40)
        losses = [r["val_loss_after"] for r in energy]
        if min(losses) > 0 and max(losses) / min(losses) > 3:
            ax.set_yscale("log")  # one diverged recipe would flatten the rest
            from matplotlib.ticker import FormatStrFormatter

            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        _label(ax, [(r["name"], r["energy"]["kwh"] * 1000, r["val_loss_after"]) for r in energy])
        ax.set_xlabel(f"energy of the run (Wh){est}")
        ax.set_ylabel("validation loss after the run (nats/token)" + (", log scale" if ax.get_yscale() == "log" else ""))
        ax.set_title("Validation loss vs energy")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        made.append(_save(fig, output / "val_loss_vs_energy.png"))
    # 4. trade-off curves, one panel per varied variable (tradeoff matrix)
    base = next((r for r in rows if r["name"] == "base"), None)
    groups = [g for g in TRADEOFF_RANGES if any(r["group"] == g for r in rows)]
    if base and groups:
        fig, axes = plt.subplots(3, len(groups), figsize=(3.2 * len(groups), 8), squeeze=False)
        for j, g in enumerate(groups):
            pts = [r for r in rows if r["group"] == g] + [base]
            numeric = all(isinstance(v, (int, float)) for v in TRADEOFF_RANGES[g])
            pts.sort(key=lambda r: r["recipe"][g] if numeric else TRADEOFF_RANGES[g].index(r["recipe"][g]))
            xs = [str(r["recipe"][g]) for r in pts]
            for i, (key, label) in enumerate((("val_loss_after", "val loss (nats/token)"),
                                              ("tokens_per_second", "tokens/s"),
                                              ("peak_memory_bytes", "peak memory (GiB)"))):
                ys = [r[key] / 2**30 if key == "peak_memory_bytes" else r[key] for r in pts]
                ax = axes[i][j]
                ax.plot(xs, ys, marker="o")
                ax.grid(alpha=0.3)
                if j == 0:
                    ax.set_ylabel(label)
                if i == 2:
                    ax.set_xlabel(g)
                ax.tick_params(axis="x", labelsize=7, rotation=30)
            axes[0][j].set_title(f"varying {g}", fontsize=9)
        fig.suptitle("Trade-offs from the study's initial values (LoRA r64, batch 2, seq 1024, lr 5e-5, all linear)",
                     fontsize=9)
        fig.tight_layout()
        made.append(_save(fig, output / "tradeoff_curves.png"))
    return made


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def render_budget(rows: list[dict], output: Path, command: str) -> str:
    from qtrain.io import atomic_write_json, atomic_write_text
    from qtrain.plan import format_bytes

    budgets = sorted({r["budget_gib"] for r in rows})
    lines = ["# What fits: the planner's pick per model and GPU memory (CUDA, no training)", "",
             f"Predicted peaks (qtrain plan, seq_len target 2048, effective batch 8, 10% safety margin). "
             f"Reproduce: `{command}`. Planner accuracy against published tables: see plan_anchors.", "",
             "| model | params (B) | " + " | ".join(f"{b} GB" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for m in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for b in budgets:
            r = next(x for x in rows if x["model"] == m and x["budget_gib"] == b)
            if r["method"] is None:
                cells.append(f"nothing (needs {r['needs']})")
            else:
                cells.append(f"{r['method']}{' +ckpt' if r['gradient_checkpointing'] else ''} seq {r['seq_len']} "
                             f"x{r['micro_batch_size']}: {format_bytes(r['predicted_peak_bytes'])}")
        size = next(x["params_b"] for x in rows if x["model"] == m)
        lines.append(f"| {m} | {size} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output / "budget.json", rows)
    atomic_write_text(output / "report.md", text)
    return text


# ---------------------------------------------------------------------------------------------- --budget answer

def measured_quality(rows: list[dict]) -> dict[str, dict]:
    """Method -> the best quality row of that method (by MBPP pass@1, then perplexity), for ranking a budget."""
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("status") != "ok" or not r.get("quality") or not r.get("steps"):
            continue
        key = (r["quality"]["pass@1"], -(r["quality"]["val_perplexity"] or float("inf")))
        cur = best.get(r["method"])
        if cur is None or key > (cur["quality"]["pass@1"], -(cur["quality"]["val_perplexity"] or float("inf"))):
            best[r["method"]] = r
    return best


def answer_budget(budget: str, model: str | None, device: str, results: list[Path], limit: int = 10) -> str:
    """The recipes that fit ``budget``. Where a quality matrix measured a method (MBPP pass@1 after equal
    wall-clock training, qtrain/quality.py), those come first, best measured quality first; the rest follow in the
    planner's order, marked as planned only. Memory and speed are measured where a bench row ran the same method /
    checkpointing / sequence length / micro-batch on this kind of device."""
    from qtrain.plan import format_bytes, plan_for
    from qtrain.recipe import Recipe

    plan = plan_for(model, budget, device, Recipe())  # as `qtrain plan` ranks: same FLOP/s, same allocator
    dev, budget_bytes = plan.device, plan.budget_bytes
    measured = []
    for d in results:
        if (Path(d) / "rows").is_dir():
            measured += [r for r in load_rows(Path(d)) if r.get("status") == "ok"]
    # a row counts for this question when it ran on this kind of device and the same model (None: the default)
    same_device = lambda m: (m.get("device", "cpu").split(":")[0] == dev.split(":")[0]  # noqa: E731
                             and m.get("model_ref") == model)
    quality = measured_quality([m for m in measured if same_device(m)])

    def match(c):
        r = c.recipe
        for m in measured:
            x = m.get("recipe")
            if x and (x["method"], x["gradient_checkpointing"], x["seq_len"], x["micro_batch_size"]) == \
                    (r.method, r.gradient_checkpointing, r.seq_len, r.micro_batch_size) and same_device(m):
                return m
        return None

    candidates = plan.candidates
    order = sorted(range(len(candidates)), key=lambda i: (
        candidates[i].recipe.method not in quality,
        -quality[candidates[i].recipe.method]["quality"]["pass@1"] if candidates[i].recipe.method in quality else 0,
        i))[:limit]
    lines = [f"recipes that fit {format_bytes(budget_bytes)} on {dev} for {plan.model}; ranked by measured quality "
             "(MBPP pass@1 after equal wall-clock training, a quality bench row of the same method) where it exists, "
             "then as the planner ranks (method, sequence length, speed); peak and tok/s measured where a bench row "
             "of the same shape ran on this device kind", "",
             f"{'#':>3}  {'method':7}{'ckpt':5}{'seq':>6}{'batch':>7}  {'peak':>10}  {'tok/s':>7}  {'quality':>22}  source"]
    for rank, i in enumerate(order, 1):
        c = candidates[i]
        r, m = c.recipe, match(c)
        peak = m["peak_memory_bytes"] if m else c.prediction.peak_bytes
        tps = m["tokens_per_second"] if m else c.prediction.tokens_per_second
        q = quality.get(r.method)
        qtext = (f"{q['quality']['pass@1']:.1%} MBPP ({q['name']})" if q else "planned only")
        src = f"measured ({m['name']}, predicted {format_bytes(c.prediction.peak_bytes)})" if m else "predicted"
        lines.append(f"{rank:>3}  {r.method:7}{'yes' if r.gradient_checkpointing else 'no':5}{r.seq_len:>6}"
                     f"{f'{r.micro_batch_size}x{r.grad_accum_steps}':>7}  {format_bytes(peak):>10}  {tps:>7.1f}  "
                     f"{qtext:>22}  {src}")
    pick = candidates[order[0]] if order else plan.chosen
    why = (f"the best measured quality that fits ({quality[pick.recipe.method]['name']})"
           if pick.recipe.method in quality else plan.reason)
    lines += ["", f"pick: #1 ({why}); `qtrain fit --budget {budget or format_bytes(budget_bytes)}` trains the planner's "
              f"pick ({plan.chosen.recipe.method})" + (f"; for this one pass method={pick.recipe.method} and its shape"
                                                       if pick is not plan.chosen else "")]
    return "\n".join(lines)


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


if __name__ == "__main__":
    _main()
