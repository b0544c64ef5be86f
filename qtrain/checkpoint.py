"""Training checkpoints: trainable weights, optimizer, scheduler, RNG and data position, written atomically.

Layout: ``RUN/checkpoints/step-000050/`` holding ``trainable.safetensors`` (only parameters that require
grad: the full model for full fine-tuning, the adapter for LoRA), ``optimizer.pt``, ``scheduler.pt``,
``rng-RANK.pt`` and ``state.json``. A checkpoint is written into a temporary directory and renamed into
place, then ``RUN/checkpoints/latest`` is replaced; a crash at any moment leaves the previous checkpoint
usable. The final model is saved separately in Hugging Face format (see train.py).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qtrain.io import atomic_write_json, atomic_write_text, make_tmp_dir, replace_dir
from qtrain.errors import QtrainError

FORMAT = 1
# Recipe keys that change the shapes of what is saved or the data order; resuming with any other value
# of these would silently train something else, so it is refused. max_steps, logging, eval and save
# intervals may change on resume.
RESUME_KEYS = ("method", "seq_len", "micro_batch_size", "grad_accum_steps", "lora_r", "lora_alpha",
               "target_modules", "optimizer", "seed", "data_format", "instruction_template", "fim_rate", "fim_mode", "val_fraction",
               "gradient_checkpointing", "dtype", "bitnet_warmup_steps", "bitnet_rms_norm")


class CheckpointError(QtrainError, RuntimeError):
    """A checkpoint is missing, corrupt or does not fit this run; the message says what to do."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require grad, by name, each tensor once (tied weights are saved under one name)."""
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().contiguous().cpu()
    return out


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict[str, Any],
                    rng_states: dict[int, dict], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; keep the newest ``keep``."""
    ckdir = checkpoints_dir(run_dir)
    final = ckdir / f"step-{step:06d}"
    tmp = make_tmp_dir(final)
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, rng in rng_states.items():
            torch.save(rng, tmp / f"rng-{rank}.pt")
        atomic_write_json(tmp / "state.json", {"format": FORMAT, "step": step, **state})
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(ckdir / "latest", final.name + "\n")
    old = sorted(p for p in ckdir.glob("step-*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckdir = checkpoints_dir(run_dir)
    pointer = ckdir / "latest"
    if not pointer.is_file():
        return None
    path = ckdir / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist; the run directory is damaged: "
                              "start again with --overwrite")
    return path


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt (state.json: {exc.__class__.__name__}); delete it "
                              "to resume from an earlier one, or start again with --overwrite") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {ckpt} has format {state.get('format')!r}, this qtrain reads {FORMAT}; "
                              "start again with --overwrite")
    return state


def check_compatible(state: dict[str, Any], recipe: dict[str, Any], model_name: str, world_size: int) -> None:
    """Refuse to resume a checkpoint made with different shapes or data order; name the first difference."""
    saved = state.get("recipe", {})
    for key in RESUME_KEYS:
        if key in saved and saved[key] != recipe.get(key):
            raise CheckpointError(f"cannot resume: the checkpoint was made with {key}={saved[key]!r}, this run has "
                                  f"{key}={recipe.get(key)!r}; use the same value, or start again with --overwrite")
    if state.get("model") != model_name:
        raise CheckpointError(f"cannot resume: the checkpoint was made from model {state.get('model')!r}, this run "
                              f"uses {model_name!r}; pass the same --model, or start again with --overwrite")
    if state.get("world_size", 1) != world_size:
        raise CheckpointError(f"cannot resume: the checkpoint was made with {state.get('world_size')} process(es), "
                              f"this run has {world_size}; launch with the same number of processes")
    if state.get("data_fingerprint") and recipe.get("_data_fingerprint") and \
            state["data_fingerprint"] != recipe["_data_fingerprint"]:
        raise CheckpointError("cannot resume: the training data changed since the checkpoint (different files or "
                              "content); use the same --data, or start again with --overwrite")


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer, scheduler, rank: int) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG from ``ckpt``; returns its state dict."""
    state = read_state(ckpt)
    try:
        weights = load_file(str(ckpt / "trainable.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt (trainable.safetensors: {exc}); delete it to resume "
                              "from an earlier one, or start again with --overwrite") from None
    params = dict(model.named_parameters())
    expected = trainable_state(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}; was it made with another method or model?")
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"checkpoint {ckpt}: {name} has shape {tuple(tensor.shape)}, the model has "
                                      f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)
    try:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
        rng_file = ckpt / f"rng-{rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
    except (OSError, RuntimeError, ValueError, EOFError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or does not fit ({exc.__class__.__name__}: "
                              f"{str(exc)[:200]}); delete it to resume from an earlier one, or start again with "
                              "--overwrite") from None
    return state


def get_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
