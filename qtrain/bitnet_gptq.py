"""An error-compensating start for BitNet b1.58: GPTQ (Frantar et al. 2023) onto the per-tensor ternary grid.

Rounding each pretrained weight to the nearest of {-1, 0, 1} x s (the paper's absmean start) leaves the
default model at a validation perplexity of 2.6e7; the errors of the 210 layers compound. GPTQ rounds one
input column at a time and moves the not-yet-rounded columns to cancel, on calibration inputs, the error
just made (the inverse Hessian of the layer's least-squares problem tells how). Layers are done block by
block in forward order, each block calibrated on the inputs that the already-ternary blocks before it
produce, so later blocks also absorb the earlier blocks' error.

The result is still one scale per tensor and values in {-1, 0, 1}, so it is stored exactly as the absmean
start is (transformers' packed ``BitLinear``, GGUF TQ2_0 / TQ1_0). Training then continues from shadow
weights built so that the training layer's own absmean ternarisation gives back exactly these values and this
scale (:func:`shadow_for`), keeping GPTQ's unrounded residuals so the straight-through estimator still sees
which weights lie near a rounding threshold.

Why not a library: AutoGPTQ/GPTQModel and optimum's GPTQ quantise to 2-8 bit integer grids with a scale (and
zero point) per group; none rounds onto a ternary grid with one scale per tensor, the only layout that
transformers' BitLinear loads. The Hessians, the damped inverse factor and the column loop are the int4
export's (qtrain/export/gptq.py); only the grid is ternary here.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import torch
from torch import nn

from qtrain import bitnet
from qtrain.export.gptq import collect_hessians, damped_problem, gptq_columns, inverse_factor

log = logging.getLogger(__name__)

SCALE_MULTIPLIERS = (0.7, 0.85, 1.0, 1.2, 1.45)  # of mean|W|; the one with the least calibration error is kept
CLIP = 0.499  # a zero's residual stays strictly inside (-s/2, s/2), so it rounds back to zero


@torch.no_grad()
def gptq_ternary(w: torch.Tensor, h: torch.Tensor, scale: float | torch.Tensor, damp: float = 0.01,
                 lazy: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``w`` [out, in] onto {-1, 0, 1} x ``scale`` given ``h`` = sum of x x^T over its inputs.

    ``scale`` is one number or one per row (rows are independent given ``h``, so several candidate scales run
    as one stacked matrix: one column loop instead of one per candidate). Returns (ternary values [out, in],
    the residual at rounding time: the value GPTQ had moved the weight to, minus its ternary value x scale).
    The inverse Hessian is factored in float64 and the column loop runs in float32 (it is most of the time)."""
    w, h = damped_problem(w.float(), h, damp)
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1).expand(w.shape[0])
    t = torch.zeros_like(w)
    resid = torch.zeros_like(w)

    def quantize(w1: torch.Tensor, i: int, col: int) -> torch.Tensor:
        x = w1[:, i]
        q = (x / scale).round_().clamp_(-1, 1)
        t[:, col] = q
        value = q * scale
        torch.sub(x, value, out=resid[:, col])
        return value

    gptq_columns(w, inverse_factor(h).float(), quantize, lazy)
    return t, resid


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """The squared error that replacing ``w`` by ``wq`` makes in the layer's outputs on the calibration inputs:
    trace((W - Wq) H (W - Wq)^T)."""
    e = (w.double() - wq.double())
    return float(((e @ h.double()) * e).sum())


@torch.no_grad()
def shadow_for(t: torch.Tensor, resid: torch.Tensor, scale: float) -> torch.Tensor:
    """Shadow weights whose absmean ternarisation (:func:`qtrain.bitnet.ternarize`) gives exactly ``t`` and the
    scale ``scale``: zeros keep their residual (clipped inside the rounding cell), non-zeros keep theirs plus one
    outward shift, found by bisection, that makes mean|W| = ``scale``. (``t x scale`` alone would not do: its
    mean |W| is ``scale`` x the share of non-zeros, so the training layer would shrink the scale.)"""
    t = t.double()
    nonzero = t != 0
    floor = 0.5 + (1 - 2 * CLIP)  # non-zeros stay above half the scale, so they round to +-1
    zero_part = (resid.clamp(-CLIP * scale, CLIP * scale) * ~nonzero).double()
    nz_mag = (scale + resid * t.sign()).double()  # |value| of a non-zero before the shift

    def build(shift: float) -> torch.Tensor:
        mag = torch.clamp(nz_mag + shift, min=floor * scale)
        return torch.where(nonzero, t.sign() * mag, zero_part)

    if not bool(nonzero.any()):
        return zero_part.float()
    lo, hi = -2.0 * scale, 2.0 * scale
    while float(build(hi).abs().mean()) < scale:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(build(mid).abs().mean()) < scale:
            lo = mid
        else:
            hi = mid
    return build(hi).float()


def _block_of(name: str) -> str:
    """The decoder block a layer belongs to (``model.layers.3.mlp.up_proj`` -> ``model.layers.3``); layers
    outside numbered blocks form one group."""
    m = re.match(r"^(.*?\.\d+)\.", name)
    return m.group(1) if m else ""


@torch.no_grad()
def gptq_start(model: nn.Module, calib: torch.Tensor, damp: float = 0.01,
               progress: Callable[[str], None] | None = None) -> dict:
    """Replace the shadow weights of every :class:`~qtrain.bitnet.BitNetLinear` of ``model`` by an
    error-compensated ternary start, block by block; ``calib`` [n, seq] are token ids from the training split.

    Returns a summary: layers, calibration tokens, seconds, and the output error of GPTQ relative to absmean
    rounding (summed over layers, on each layer's own calibration inputs)."""
    t0 = time.perf_counter()
    bit = bitnet.layers(model)
    groups: dict[str, dict[str, nn.Module]] = {}
    for n, m in bit.items():
        groups.setdefault(_block_of(n), {})[n] = m
    was_training = model.training
    model.eval()
    bitnet.set_strength(model, 1.0)
    err_gptq = err_absmean = 0.0
    try:
        for k, (block, mods) in enumerate(groups.items()):
            hs = collect_hessians(model, calib, list(mods))
            for n, m in mods.items():
                w = m.weight.detach().float()
                absmean = float(w.abs().mean().clamp(min=1e-8))
                t_rtn, inv = bitnet.ternarize(w)
                err_absmean += output_error(w, t_rtn / inv, hs[n])
                k_, rows = len(SCALE_MULTIPLIERS), w.shape[0]
                scales = torch.tensor(SCALE_MULTIPLIERS).mul(absmean).repeat_interleave(rows)
                t_all, r_all = gptq_ternary(w.repeat(k_, 1), hs[n], scales, damp)
                errs = [output_error(w, t_all[j * rows:(j + 1) * rows] * scales[j * rows], hs[n]) for j in range(k_)]
                j = min(range(k_), key=errs.__getitem__)
                err, scale = errs[j], float(scales[j * rows])
                t, resid = t_all[j * rows:(j + 1) * rows], r_all[j * rows:(j + 1) * rows]
                err_gptq += err
                m.weight.copy_(shadow_for(t, resid, scale).to(m.weight.dtype))
            if progress is not None:
                progress(f"bitnet start (GPTQ): block {k + 1}/{len(groups)} {block or '(ungrouped)'} "
                         f"{time.perf_counter() - t0:.0f}s")
    finally:
        model.train(was_training)
    return {"layers": len(bit), "calibration_tokens": int(calib.numel()),
            "seconds": round(time.perf_counter() - t0, 1),
            "output_error_vs_absmean": round(err_gptq / err_absmean, 4) if err_absmean else None}
