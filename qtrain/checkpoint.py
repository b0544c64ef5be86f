"""Training checkpoints: trainable weights, optimizer, scheduler, RNG and data position, written atomically.

Layout: ``RUN/checkpoints/step-000050/`` holding ``trainable.safetensors`` (only parameters that require
grad: the full model for full fine-tuning, the adapter for LoRA), ``optimizer.pt``, ``scheduler.pt``,
``rng-RANK.json`` + ``rng-RANK.safetensors`` and ``state.json``. A checkpoint is written into a temporary
directory, every file and the directory fsynced, and renamed into place, then ``RUN/checkpoints/latest`` is
replaced; a crash at any moment leaves the previous checkpoint usable. The final model is saved separately in
Hugging Face format (see train.py).

A run directory may come from someone else, so nothing in it is unpickled: the optimizer and scheduler states
load with ``torch.load(weights_only=True)`` (tensors and plain containers only) and the RNG states are JSON and
safetensors. Resuming tries ``latest`` first and falls back to the newest intact checkpoint when it is corrupt.
"""

from __future__ import annotations

import json
import os
import pickle  # only for its error type: nothing here unpickles
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
from qtrain.sharding import local, optimizer_state_local, optimizer_state_sharded
from qtrain.errors import QtrainError

FORMAT = 1
# Recipe keys that change the shapes of what is saved or the data order; resuming with any other value
# of these would silently train something else, so it is refused. max_steps, logging, eval and save
# intervals may change on resume.
RESUME_KEYS = ("method", "seq_len", "micro_batch_size", "grad_accum_steps", "lora_r", "lora_alpha",
               "target_modules", "optimizer", "seed", "data_format", "instruction_template", "fim_rate", "fim_mode", "val_fraction",
               "gradient_checkpointing", "dtype", "bitnet_warmup_steps", "bitnet_rms_norm", "fsdp")


class CheckpointError(QtrainError, RuntimeError):
    """A checkpoint is missing, corrupt or does not fit this run; the message says what to do."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read; an older checkpoint may still be intact."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require grad, by name, each tensor once (tied weights are saved under one name)."""
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            # under FSDP, this process's shard (see qtrain/sharding.py)
            out[name] = local(p).detach().contiguous().cpu()
    return out


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict[str, Any],
                    rng_states: dict[int, dict], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; keep the newest ``keep``."""
    tmp = begin_checkpoint(run_dir, step)
    try:
        write_model_files(tmp, model, optimizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_checkpoint(run_dir, step, tmp, scheduler, state, rng_states, keep)


def model_file_names(rank: int | None) -> tuple[str, str]:
    """(weights, optimizer) file names: one pair per process for a sharded run (``rank`` given), else one."""
    if rank is None:
        return "trainable.safetensors", "optimizer.pt"
    return f"trainable-rank{rank}.safetensors", f"optimizer-rank{rank}.pt"


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """The temporary directory checkpoint ``step`` is written into (by every process of a sharded run)."""
    return make_tmp_dir(checkpoints_dir(run_dir) / f"step-{step:06d}")


def write_model_files(tmp: Path, model: nn.Module, optimizer, rank: int | None = None) -> None:
    """The trainable weights and the optimizer state (with ``rank``: this process's shards of them)."""
    weights, opt = model_file_names(rank)
    save_file(trainable_state(model), str(tmp / weights))
    opt_state = optimizer.state_dict()
    if rank is not None:
        opt_state = optimizer_state_local(opt_state)
    torch.save(opt_state, tmp / opt)


def finish_checkpoint(run_dir: Path, step: int, tmp: Path, scheduler, state: dict[str, Any],
                      rng_states: dict[int, dict], keep: int = 2) -> Path:
    """Scheduler, RNG and state into ``tmp``, everything fsynced, renamed into place, ``latest`` pointed at it."""
    ckdir = checkpoints_dir(run_dir)
    final = ckdir / f"step-{step:06d}"
    try:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, rng in rng_states.items():
            save_rng_state(rng, tmp, rank)
        atomic_write_json(tmp / "state.json", {"format": FORMAT, "step": step, **state})
        _fsync_tree(tmp)
        replace_dir(tmp, final)
        _fsync_dir(ckdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(ckdir / "latest", final.name + "\n")
    old = sorted(p for p in ckdir.glob("step-*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _fsync_tree(directory: Path) -> None:
    """Flush every file of ``directory`` and the directory itself to disk (rename alone does not order them)."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckdir = checkpoints_dir(run_dir)
    pointer = ckdir / "latest"
    if not pointer.is_file():
        return None
    path = ckdir / pointer.read_text().strip()
    if not path.is_dir() or path.parent != ckdir:
        older = checkpoints_newest_first(run_dir)
        if older:
            return older[0]
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist; the run directory is damaged: "
                              "start again with --overwrite")
    return path


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    return sorted((p for p in checkpoints_dir(run_dir).glob("step-*") if p.is_dir()), reverse=True)


def resume_from(run_dir: Path, model: nn.Module, optimizer, scheduler, rank: int, check, say=print) -> tuple:
    """Load ``latest``, or when it is corrupt the newest intact checkpoint before it: (path, state).

    ``check(state)`` raises when a checkpoint does not fit this run; that is not corruption, so it stops the
    search (an older checkpoint of the same run would not fit either).
    """
    latest = latest_checkpoint(run_dir)
    candidates = [latest] + [p for p in checkpoints_newest_first(run_dir) if p != latest]
    errors = []
    for path in candidates:
        try:
            check(read_state(path))
            state = load_checkpoint(path, model, optimizer, scheduler, rank)
        except CorruptCheckpoint as exc:
            errors.append(str(exc))
            say(f"{exc}; trying an older checkpoint")
            continue
        return path, state
    raise CheckpointError(f"no intact checkpoint in {checkpoints_dir(run_dir)} ({len(errors)} corrupt); start again "
                          "with --overwrite")


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"checkpoint {ckpt} is corrupt (state.json: {exc.__class__.__name__})") from None
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
    sharded = bool(state.get("sharded"))
    weights_name, opt_name = model_file_names(rank if sharded else None)
    try:
        weights = load_file(str(ckpt / weights_name))
    except (OSError, SafetensorError) as exc:
        raise CorruptCheckpoint(f"checkpoint {ckpt} is corrupt ({weights_name}: {exc})") from None
    params = dict(model.named_parameters())
    expected = trainable_state(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}; was it made with another method or model?")
    with torch.no_grad():
        for name, tensor in weights.items():
            target = local(params[name])
            if target.shape != tensor.shape:
                raise CheckpointError(f"checkpoint {ckpt}: {name} has shape {tuple(tensor.shape)}, the model has "
                                      f"{tuple(target.shape)}")
            target.copy_(tensor)
    try:
        optimizer_state = torch.load(ckpt / opt_name, map_location="cpu", weights_only=True)
        scheduler_state = torch.load(ckpt / "scheduler.pt", weights_only=True)
        rng = load_rng_state(ckpt, rank)
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, SafetensorError, pickle.UnpicklingError) as exc:
        # weights_only=True refuses anything but tensors and plain containers with an UnpicklingError
        raise CorruptCheckpoint(f"checkpoint {ckpt} is corrupt or not a plain-data checkpoint "
                                f"({exc.__class__.__name__}: {str(exc)[:200]})") from None
    try:
        if sharded:
            optimizer_state = optimizer_state_sharded(optimizer_state, optimizer)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}'s optimizer state does not fit this run ({exc.__class__.__name__}: "
                              f"{str(exc)[:200]}); start again with --overwrite") from None
    if rng is not None:
        set_rng_state(rng)
    return state


def get_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_rng_state(state: dict, directory: Path, rank: int) -> None:
    """Python's and NumPy's generator states as JSON, torch's as tensors: nothing that needs unpickling."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    atomic_write_json(directory / f"rng-{rank}.json", {
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]})
    tensors = {"torch": state["torch"]}
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = s
    save_file(tensors, str(directory / f"rng-{rank}.safetensors"))


def load_rng_state(directory: Path, rank: int) -> dict | None:
    """This rank's RNG state, or None when the checkpoint has none for it (another world size)."""
    meta, tensors = directory / f"rng-{rank}.json", directory / f"rng-{rank}.safetensors"
    if not meta.is_file() or not tensors.is_file():
        return None
    data = json.loads(meta.read_text())
    t = load_file(str(tensors))
    version, internal, gauss = data["python"]
    name, keys, pos, has_gauss, cached = data["numpy"]
    state = {"python": (version, tuple(internal), gauss),
             "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached), "torch": t["torch"]}
    cuda = [t[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in t))]
    if cuda:
        state["cuda"] = cuda
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
