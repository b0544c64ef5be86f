"""GPTQ (Frantar et al. 2023) for the int4 ONNX export: error-compensating rounding onto MatMulNBits' own grid.

Why our own: onnxruntime's ``MatMulNBitsQuantizer`` offers GPTQ only through Intel Neural Compressor (not a
dependency here), and its default is round-to-nearest (RTN), which on the 135M default model cost +25% perplexity
at 4 bits (+7.6% with this GPTQ: benchmarks/results/export_speed.md, int4_rounding.md). GPTQ quantises one input
column at a time and spreads each column's rounding error over the columns not yet quantised, weighted by the
inverse Hessian of the layer's inputs (H = X^T X over calibration text), so the layer's *outputs* move as little
as possible; act-order visits the inputs with the most energy first.

The grid is exactly the one ``MatMulNBits`` decodes, in blocks of ``block_size`` input channels: symmetric,
value = (q - 8) * scale with scale = (signed extreme of the block) / -8, or with a 4-bit zero point per block,
value = (q - zp) * scale. The RTN export is made first with onnxruntime's quantizer; each 4-bit node's blobs are
decoded and must equal our RTN bit for bit (the layout check), then GPTQ's codes, scales and zero points replace
them (same shapes and layout: per output row and block, two 4-bit codes per byte, low nibble first), so the
graph, kernels and loading stay onnxruntime's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _grid(g: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) per block of ``g`` [..., block], as onnxruntime's MLAS quantizer computes them.

    Symmetric: scale = the signed extreme / -8 (the negative one when |min| == max), zero point 8.
    Asymmetric: scale = (max(max, 0) - min(min, 0)) / 15, zero point = roundf(-min / scale) in 0..15.
    """
    hi, lo = g.amax(-1), g.amin(-1)
    if symmetric:
        scale = torch.where(lo.abs() >= hi.abs(), lo, hi) / -8.0
        return scale, torch.full_like(scale, 8.0)
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    scale = (hi - lo) / 15.0
    recip = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    return scale, torch.clamp(torch.floor(-lo * recip + 0.5), 0, 15)


def _round(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes 0..15: roundf(x * (1/scale) + zero), halves up, as MLAS rounds."""
    recip = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    return torch.clamp(torch.floor(x * recip + zero + 0.5), 0, 15)


def rtn_grid(w: torch.Tensor, block: int, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes 0..15 as uint8 [rows, cols], scales [rows, cols/block], zero points [rows, cols/block]) by
    round-to-nearest on MatMulNBits' grid, bit for bit as onnxruntime makes them (checked against
    ``quantize_matmul_4bits`` on bf16-valued weights, where ties are common)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // block, block)
    scale, zero = _grid(g, symmetric)
    q = _round(g, scale.unsqueeze(-1), zero.unsqueeze(-1))
    return q.reshape(rows, cols).to(torch.uint8), scale, zero


def dequantize(codes: torch.Tensor, scales: torch.Tensor, block: int, zeros: torch.Tensor | None = None) -> torch.Tensor:
    rows, cols = codes.shape
    zeros = torch.full_like(scales, 8.0) if zeros is None else zeros.float()
    g = codes.float().reshape(rows, cols // block, block) - zeros.unsqueeze(-1)
    return (g * scales.unsqueeze(-1)).reshape(rows, cols)


def damped_problem(w: torch.Tensor, h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(``w``, ``h``) ready for GPTQ: inputs never seen (zero Hessian diagonal) get weight 0 and diagonal 1, and
    the diagonal is raised by ``damp`` x its mean so the factorisation holds on few calibration tokens. ``h`` is
    returned in float64; ``w`` is a copy in its own dtype."""
    w = w.detach().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    return w, h


def inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1, whose rows give each column's error spread (Frantar et al., alg. 1)."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_columns(w: torch.Tensor, hinv: torch.Tensor, quantize: Callable[[torch.Tensor, int, int], torch.Tensor],
                 lazy: int = 128) -> None:
    """GPTQ's column loop over ``w`` [out, in] (changed in place), in lazy batches of ``lazy`` columns.

    ``quantize(w1, i, col)`` rounds column ``i`` of the current batch ``w1`` (column ``col`` of ``w``; it may
    read the columns after it, as a block grid does) onto the caller's grid, records the codes, and returns the
    value it stands for; the rounding error, scaled by the inverse Hessian, is moved onto the columns not yet
    rounded. The grids (int4 blocks for the export, the ternary grid for BitNet's start) are the callers'."""
    cols = w.shape[1]
    for i1 in range(0, cols, lazy):
        i2 = min(i1 + lazy, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            e = (w1[:, i] - quantize(w1, i, i1 + i)) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def gptq(w: torch.Tensor, h: torch.Tensor, block: int = 32, damp: float = 0.01, lazy: int = 128,
         symmetric: bool = True, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of one weight ``w`` [out, in] given ``h`` = sum of x x^T over its inputs [in, in].

    Returns (codes uint8 [out, in], scales and zero points [out, in/block]). Without ``act_order`` columns go
    left to right and each block's grid is fixed when GPTQ reaches the block, from the weights as updated by
    then. With ``act_order`` columns go in order of decreasing Hessian diagonal (the inputs with the most energy
    first, while the most columns remain to absorb their error) and, since a block's columns are then visited
    out of order, every block's grid comes from the original weights ("static groups", as in AutoGPTQ).
    """
    w, h = damped_problem(w.double(), h, damp)
    rows, cols = w.shape
    nblocks = cols // block
    scales = torch.zeros(rows, nblocks, dtype=torch.float64)
    zeros = torch.zeros(rows, nblocks, dtype=torch.float64)
    perm = torch.arange(cols)
    if act_order:
        scales[:], zeros[:] = _grid(w.reshape(rows, nblocks, block), symmetric)
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    codes = torch.zeros(rows, cols, dtype=torch.uint8)

    def quantize(w1: torch.Tensor, i: int, pos: int) -> torch.Tensor:
        col = int(perm[pos])
        blk = col // block
        if not act_order and col % block == 0:  # a new block: its grid from the current (updated) weights
            scales[:, blk], zeros[:, blk] = _grid(w1[:, i:i + block], symmetric)
        s, z = scales[:, blk], zeros[:, blk]
        q = _round(w1[:, i], s, z)
        codes[:, col] = q.to(torch.uint8)
        return (q - z) * s

    # whole blocks per lazy batch: a block's grid reads its columns from the batch
    gptq_columns(w, inverse_factor(h), quantize, lazy=-(-lazy // block) * block)
    return codes, scales.float(), zeros.float()


class _AllSeen(Exception):
    """Raised by a hook once every layer asked for has seen this sequence's input: the rest of the forward pass
    is not needed."""


def collect_hessians(model: nn.Module, seqs: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """H = sum over calibration tokens of x x^T for the input of each named linear layer (fp64 totals of fp32
    per-sequence products). Layers fed the same tensor (q/k/v, gate/up) share one product. Each sequence's
    forward pass stops once every named layer has seen its input (each runs once a pass in a decoder), so
    calibrating the first blocks of a model costs a fraction of a forward pass."""
    mods = dict(model.named_modules())
    hs: dict[str, torch.Tensor] = {}
    fired: set[str] = set()
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # this sequence's (input, product) by input address

    def hook_for(name: str):
        def hook(_m, args):
            x = args[0].detach()
            key = x.data_ptr()
            if key not in seen or seen[key][0] is not x:
                x2 = x.reshape(-1, x.shape[-1]).float()
                # the input is kept referenced, so its address cannot be reused by another tensor this forward
                seen[key] = (x, (x2.T @ x2).double())
            hs[name] = hs[name] + seen[key][1] if name in hs else seen[key][1].clone()
            fired.add(name)
            if len(fired) == len(set(names)):
                raise _AllSeen
        return hook

    hooks = [mods[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for i in range(len(seqs)):
                fired.clear()
                seen.clear()
                try:
                    model(input_ids=seqs[i:i + 1], use_cache=False)
                except _AllSeen:
                    pass
    finally:
        for hk in hooks:
            hk.remove()
    return hs


def pack(codes: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits' B layout for 4 bits: [rows, cols/block, block/2] uint8, low nibble = even column."""
    rows, cols = codes.shape
    c = codes.reshape(rows, cols // block, block // 2, 2).astype(np.uint8)
    return (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)


def unpack(blob: np.ndarray, rows: int, cols: int) -> np.ndarray:
    lo, hi = blob & 0x0F, blob >> 4
    return np.stack([lo, hi], axis=-1).reshape(rows, cols)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def apply_gptq(fp32_onnx: Path, int4_onnx: Path, model: nn.Module, calib: torch.Tensor, block: int,
               act_order: bool = True) -> dict:
    """Replace the 4-bit RTN weights of ``int4_onnx`` (made from ``fp32_onnx`` by onnxruntime) with GPTQ's,
    computed on ``model`` (the same weights in PyTorch) with the calibration sequences ``calib``; in place.
    Symmetric and asymmetric (zero-point) nodes alike: each keeps its kind of grid."""
    import time

    import onnx
    from onnx import numpy_helper

    start = time.perf_counter()
    src = onnx.load(str(fp32_onnx))
    by_digest = {}
    for init in src.graph.initializer:
        if len(init.dims) == 2:
            by_digest.setdefault(_digest(numpy_helper.to_array(init)), init.name)
    # PyTorch linear weight [out, in] is ONNX MatMul B [in, out]
    wanted = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.in_features % block == 0:
            d = _digest(m.weight.detach().T.float().numpy())
            if d in by_digest:
                wanted[by_digest[d]] = name
    q = onnx.load(str(int4_onnx))
    inits = {i.name: i for i in q.graph.initializer}
    targets = []
    for node in q.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits") != 4 or attrs.get("block_size") != block:
            continue  # the 8-bit head, other block sizes: left as they are
        b_name, s_name = node.input[1], node.input[2]
        z_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
        if len(node.input) > 4 and any(node.input[4:]):
            continue  # group indices or bias: a layout this code does not write
        base = b_name[: -len("_Q4")] if b_name.endswith("_Q4") else None
        if base in wanted:
            targets.append((wanted[base], b_name, s_name, z_name, attrs["N"], attrs["K"]))
    hs = collect_hessians(model, calib, sorted({t[0] for t in targets}))
    mods = dict(model.named_modules())
    changed, before, after = 0, [], []
    for mod_name, b_name, s_name, z_name, n, k in targets:
        symmetric = z_name is None
        w = mods[mod_name].weight.detach().float()
        # the RTN blob onnxruntime wrote must decode to our RTN: the layout is understood, or we stop
        blob = numpy_helper.to_array(inits[b_name])
        rtn = rtn_grid(w, block, symmetric)
        same = np.array_equal(unpack(blob, n, k), rtn[0].numpy())
        if z_name is not None:
            zp = numpy_helper.to_array(inits[z_name])
            same = same and np.array_equal(unpack(zp.reshape(n, -1), n, zp.size * 2 // n)[:, : k // block],
                                           rtn[2].numpy())
        if not same:
            raise RuntimeError(f"MatMulNBits layout of {b_name} is not the one expected; GPTQ not applied")
        codes, scales, zeros = gptq(w, hs[mod_name], block, symmetric=symmetric, act_order=act_order)
        x_h = hs[mod_name].float()
        for bucket, (c, sc, z) in ((before, rtn), (after, (codes, scales, zeros))):
            d = dequantize(c, sc, block, z) - w
            bucket.append(float(torch.einsum("oi,ij,oj->", d, x_h, d)))
        inits[b_name].CopyFrom(numpy_helper.from_array(pack(codes.numpy(), block).reshape(blob.shape), b_name))
        old_s = numpy_helper.to_array(inits[s_name])
        inits[s_name].CopyFrom(numpy_helper.from_array(scales.numpy().astype(old_s.dtype).reshape(old_s.shape), s_name))
        if z_name is not None:
            zc = zeros.numpy().astype(np.uint8)
            if zc.shape[1] % 2:  # two zero points per byte, per output row
                zc = np.concatenate([zc, np.zeros((n, 1), np.uint8)], axis=1)
            inits[z_name].CopyFrom(numpy_helper.from_array(pack(zc, 2).reshape(zp.shape), z_name))
        changed += 1
    onnx.save_model(q, str(int4_onnx))
    ratio = sum(after) / max(sum(before), 1e-30)
    return {"method": "gptq", "act_order": act_order, "layers": changed, "calibration_tokens": int(calib.numel()),
            "output_error_vs_rtn": round(ratio, 4), "seconds": round(time.perf_counter() - start, 1),
            "note": "output error = sum over layers of tr(dW H dW^T), GPTQ relative to round-to-nearest"}


# Installed with qtrain on every machine, so "general code" needs no download. Third-party library code, unlike
# the standard library the default corpus is; benchmarks/int4_offdomain.py holds out peft, accelerate and fastapi
# (also installed, not listed here) to measure what calibrating on this buys on code neither set contains.
GENERAL_CODE_PACKAGES = ("numpy", "transformers", "torch", "matplotlib", "rich", "yaml", "safetensors", "psutil")
CALIBRATIONS = ("mix", "train")


def general_code_files(packages=GENERAL_CODE_PACKAGES, per_package: int = 40) -> list[Path]:
    """Up to ``per_package`` Python sources of each installed package (every k-th in path order, tests skipped),
    interleaved so that any prefix of the list spans every package."""
    import importlib.util

    from qtrain.data.corpus import iter_source_files

    picked = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        files = [f for root in spec.submodule_search_locations
                 for f in iter_source_files(Path(root), (".py",), skip_tests=True)]
        step = max(1, len(files) // per_package)
        picked.append(files[::step][:per_package])
    return [f for group in zip(*picked) for f in group] if picked else []


def _token_rows(tokenizer, texts, rows: int, seq_len: int) -> list[list[int]]:
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= rows * seq_len:
            break
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(len(ids) // seq_len)][:rows]


def calibration_sequences(tokenizer, data: str | None, n: int = 64, seq_len: int = 512,
                          calibration: str = "mix") -> torch.Tensor:
    """GPTQ's calibration text, [rows, seq_len] token ids: the *training* split of ``data`` (the parity report
    uses the validation split), or with ``calibration="mix"`` half of it and half general code
    (:data:`GENERAL_CODE_PACKAGES`), so the Hessians also see code outside the training domain."""
    from qtrain.data.corpus import drop_reason, load_corpus

    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration {calibration!r}: use one of {', '.join(CALIBRATIONS)}")
    train_docs, _, _ = load_corpus(data)
    general = []
    if calibration == "mix":
        texts = (f.read_text(encoding="utf-8", errors="replace") for f in general_code_files())
        general = _token_rows(tokenizer, (t for t in texts if drop_reason(t, 1_000, 1_000_000) is None),
                              n // 2, seq_len)
    rows = _token_rows(tokenizer, (d.text for d in train_docs), n - len(general), seq_len) + general
    if not rows:  # less text than one row: all of it, as one shorter row
        ids = [t for d in train_docs for t in tokenizer(d.text, add_special_tokens=False)["input_ids"]]
        return torch.tensor([ids[:seq_len]])
    return torch.tensor(rows)
