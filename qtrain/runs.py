"""Load what ``qtrain fit`` produced: a run directory with a PEFT adapter or a full model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qtrain.models import ModelError, ModelSource, load_model


RUN_MARKER = "run.json"  # written by qtrain fit; the only file that makes a directory a qtrain run


def read_marker(run_dir: str | Path) -> dict | None:
    """The run's marker when ``run_dir`` holds a valid one (a JSON object with ``"qtrain_run": 1``), else None.
    Anything else named run.json (another tool's, a damaged one) does not make a directory a qtrain run, so
    ``--overwrite`` will not delete it."""
    marker = Path(run_dir) / RUN_MARKER
    try:
        if not marker.is_file() or marker.stat().st_size > 1 << 20:
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("qtrain_run") == 1 else None


def is_run_dir(path: str | Path | None) -> bool:
    return path is not None and read_marker(path) is not None


def read_run(run_dir: str | Path) -> dict:
    meta = read_marker(run_dir)
    if meta is None:
        raise ModelError(f"{str(run_dir)!r} is not a qtrain run directory (no valid run.json); give the --output of "
                         "`qtrain fit`")
    return meta


def load_trained(run_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The fine-tuned model of a run: base + adapter for LoRA (embeddings resized if tokens were added), or full."""
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    meta = read_run(run_dir)
    if (run_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_model(ModelSource(meta["model_source"], meta["base_model"], meta["model"]), dtype=dtype)
        if base.get_input_embeddings().num_embeddings != meta["vocab_size"]:
            base.resize_token_embeddings(meta["vocab_size"])
        return PeftModel.from_pretrained(base, run_dir)
    if (run_dir / "config.json").is_file():
        from qtrain.bitnet import is_bitnet_dir, load_packed

        if is_bitnet_dir(run_dir):  # packed ternary layers, loaded by transformers' BitNet support
            return load_packed(run_dir)
        return AutoModelForCausalLM.from_pretrained(run_dir, dtype=dtype)
    raise ModelError(f"run directory {str(run_dir)!r} holds no trained model (no adapter_config.json or config.json): "
                     "the run did not finish; continue it with `qtrain fit -o DIR --resume`")
