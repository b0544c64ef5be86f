"""``qtrain plan --measure``: run the planned recipe for a few steps on this device and set what it measured
beside what the planner predicted, so a user can check the planner on their own hardware in a minute.

Each recipe runs as ``qtrain fit`` in a fresh process (the allocator, memory and threads a real run gets, and a
peak that no earlier run in this process inflates), on the embedded data unless ``data`` is given, with no
checkpoints and a tiny validation set; only its summary is kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from qtrain.errors import QtrainError
from qtrain.plan import Candidate, Plan

MEASURE_OVERRIDES = {"save_every": 0, "eval_every": 0, "val_max_sequences": 2, "warmup_steps": 1, "log_every": 1}


class MeasureError(QtrainError, RuntimeError):
    """A measuring run failed; the message carries the last line it printed."""


def measure_candidate(candidate: Candidate, model: str | None, data: str | None, steps: int,
                      timeout_s: float = 1800) -> dict:
    """Train ``candidate``'s recipe for ``steps`` steps in a fresh ``qtrain fit`` process; predicted vs measured."""
    from qtrain.recipe import save_recipe

    recipe = dataclasses.replace(candidate.recipe, max_steps=steps, **MEASURE_OVERRIDES)
    with tempfile.TemporaryDirectory(prefix="qtrain-measure-") as tmp:
        recipe_path, out = Path(tmp) / "recipe.yaml", Path(tmp) / "run"
        save_recipe(recipe, recipe_path)
        cmd = [sys.executable, "-m", "qtrain", "fit", "--recipe", str(recipe_path), "-o", str(out)]
        cmd += (["--model", model] if model else []) + (["--data", data] if data else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
        if proc.returncode != 0 or not (out / "summary.json").is_file():
            tail = [x for x in proc.stderr.strip().splitlines() if x.strip()][-1:] or [f"exit code {proc.returncode}"]
            raise MeasureError(f"measuring {recipe.method} (seq {recipe.seq_len}, micro-batch "
                               f"{recipe.micro_batch_size}) failed: {tail[0][-400:]}")
        summary = json.loads((out / "summary.json").read_text())
    predicted, measured = candidate.prediction.peak_bytes, summary["peak_memory_bytes"]
    return {**candidate.row(), "steps": summary["steps"], "measured_peak_bytes": measured,
            "peak_error": round(predicted / measured - 1, 4) if measured else None,
            "measured_tokens_per_second": summary["tokens_per_second"], "allocator": summary.get("allocator"),
            "device": summary.get("device"), "cuda_memory": summary.get("cuda_memory"),
            "backoffs": summary.get("backoffs")}


def measure_plan(plan: Plan, model: str | None, data: str | None = None, steps: int = 3,
                 say=print) -> list[dict]:
    """Measure the plan's pick (what `qtrain fit --budget` would train)."""
    if plan.chosen is None:
        raise MeasureError("nothing fits the budget, so there is nothing to measure; raise --budget")
    if steps < 1:
        raise MeasureError(f"--measure-steps {steps} must be positive")
    r = plan.chosen.recipe
    say(f"measuring the pick on {plan.device}: {r.method}, seq {r.seq_len}, micro-batch {r.micro_batch_size}"
        f"{', checkpointing' if r.gradient_checkpointing else ''}, {steps} steps ...")
    return [measure_candidate(plan.chosen, model, data, steps)]


def render_measured(rows: list[dict]) -> str:
    from qtrain.plan import format_bytes

    lines = ["", "predicted against measured (a fresh `qtrain fit` process):",
             f"{'method':7}{'ckpt':5}{'seq':>6}{'batch':>7}  {'predicted':>11}  {'measured':>11}  {'error':>7}  "
             f"{'tok/s pred':>10}  {'tok/s meas':>10}"]
    for x in rows:
        lines.append(f"{x['method']:7}{'yes' if x['gradient_checkpointing'] else 'no':5}{x['seq_len']:>6}"
                     f"{x['micro_batch_size']:>7}  {format_bytes(x['predicted_peak_bytes']):>11}  "
                     f"{format_bytes(x['measured_peak_bytes']):>11}  {x['peak_error']:>+7.1%}  "
                     f"{x['predicted_tokens_per_second']:>10.1f}  {x['measured_tokens_per_second']:>10.1f}")
    lines.append("error = predicted / measured - 1: negative means the planner predicted too little (the risky side)")
    return "\n".join(lines)
