"""Sharded training (``fsdp: true`` under several processes): FSDP2's ``fully_shard`` on each decoder layer and on
the whole model, so every process holds 1/N of the weights, gradients and optimizer states.

torch's ``fully_shard`` is called directly rather than through accelerate's FSDP plugin: accelerate enables FSDP
only for GPU process groups, and the same code path then runs, and is tested, on CPU processes under gloo. The
process group is still accelerate's (``accelerate launch``), and the optimizer is still prepared by it.

Checkpoints stay plain data: each process writes its own shards (``trainable-rankR.safetensors``,
``optimizer-rankR.pt`` with plain tensors), which resume only with the same number of processes; the final model
is gathered whole and saved in Hugging Face format like any other run.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.recipe import Recipe, RecipeError


def wanted(recipe: Recipe, world: int) -> bool:
    """Whether this run shards: ``fsdp`` asked for and more than one process to shard over."""
    if not recipe.fsdp or world <= 1:
        return False
    if recipe.dtype == "float16":
        raise RecipeError("fsdp=true with dtype=float16: fp16 loss scaling is not written for sharded gradients; "
                          "use dtype=bfloat16 (or float32)")
    return True


def decoder_layer_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes transformers itself keeps whole when splitting a model across devices (``_no_split_modules``):
    each one becomes an FSDP unit, gathered and freed in turn."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    classes = {type(m) for m in base.modules() if type(m).__name__ in names}
    if not classes:
        raise RecipeError(f"fsdp=true: {type(base).__name__} names no decoder layer class (_no_split_modules), so "
                          "there is nothing to shard layer by layer; set fsdp=false")
    return tuple(classes)


def shard(model: nn.Module, device: torch.device, world: int, compute_dtype: torch.dtype | None) -> int:
    """Shard ``model`` in place over ``world`` processes; returns the number of FSDP units. Under mixed precision
    (``compute_dtype`` bf16) the weights are all-gathered in bf16 and gradients reduced in fp32, which is what
    autocast does for an unsharded model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else \
        MixedPrecisionPolicy()
    layers = decoder_layer_classes(model)
    units = [m for m in model.modules() if isinstance(m, layers)]
    for m in units:
        fully_shard(m, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return len(units) + 1


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (the tensor itself otherwise)."""
    return t.to_local() if is_sharded(t) else t


def like(shard_of: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a local shard read from a checkpoint) as a sharded tensor laid out like ``shard_of``."""
    if not is_sharded(shard_of):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t.to(shard_of.to_local().device), shard_of.device_mesh, shard_of.placements,
                              run_check=False, shape=shard_of.shape, stride=shard_of.stride())


def optimizer_state_local(state: dict) -> dict:
    """An optimizer state dict with every sharded tensor replaced by this process's shard (plain tensors, so it
    saves and loads with ``torch.load(weights_only=True)``)."""
    return {**state, "state": {k: {n: local(v) if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                               for k, s in state["state"].items()}}


def optimizer_state_sharded(state: dict, optimizer) -> dict:
    """The inverse of :func:`optimizer_state_local` for ``optimizer``'s parameters (in its own index order)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {}
    for k, s in state["state"].items():
        p = params[int(k)]
        out[k] = {n: like(p, v) if isinstance(v, torch.Tensor) and v.ndim > 0 else v for n, v in s.items()}
    return {**state, "state": out}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state, gathered on the main process in CPU memory (every process must call it; the
    others get an empty dict). A tied weight is kept under its first name only, as save_pretrained writes it
    for an unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tied = every - {n for n, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k not in tied}
