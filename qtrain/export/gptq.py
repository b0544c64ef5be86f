"""GPTQ (Frantar et al. 2023) for the int4 ONNX export: error-compensating rounding onto MatMulNBits' own grid.

Why our own: onnxruntime's ``MatMulNBitsQuantizer`` offers GPTQ only through Intel Neural Compressor (not a
dependency here), and its default is round-to-nearest (RTN), which on the 135M default model cost +25% perplexity
at 4 bits. GPTQ quantises one input column at a time and spreads each column's rounding error over the columns
not yet quantised, weighted by the inverse Hessian of the layer's inputs (H = X^T X over calibration text), so the
layer's *outputs* move as little as possible.

The grid is exactly the one ``MatMulNBits`` decodes (symmetric, blocks of ``block_size`` input channels):
value = (q - 8) * scale, q in 0..15, scale = (signed value of largest magnitude in the block) / -8. The RTN
export is made first with onnxruntime's quantizer; then each 4-bit node's packed weights and scales are
replaced by GPTQ's (same shapes, same layout: per output row and block, two 4-bit codes per byte, low nibble
first), so the graph, kernels and loading stay onnxruntime's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn


def rtn_grid(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes 0..15 as uint8 [rows, cols], scales [rows, cols/block]) by round-to-nearest on MatMulNBits' grid,
    bit for bit as onnxruntime's MLAS quantizer makes them (checked against ``quantize_matmul_4bits`` on
    bf16-valued weights, where ties are common): the scale is the signed extreme / -8, the negative one when
    |min| == max; codes are roundf(w * (1/scale) + 8), i.e. halves round up, clamped to 0..15."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // block, block)
    hi, lo = g.amax(-1), g.amin(-1)
    scale = torch.where(lo.abs() >= hi.abs(), lo, hi) / -8.0
    recip = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    q = torch.clamp(torch.floor(g * recip.unsqueeze(-1) + 8.0 + 0.5), 0, 15)
    return q.reshape(rows, cols).to(torch.uint8), scale


def dequantize(codes: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = codes.shape
    return ((codes.float() - 8).reshape(rows, cols // block, block) * scales.unsqueeze(-1)).reshape(rows, cols)


def gptq(w: torch.Tensor, h: torch.Tensor, block: int = 32, damp: float = 0.01, lazy: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one weight ``w`` [out, in] given ``h`` = sum of x x^T over its inputs [in, in].

    Returns (codes uint8 [out, in], scales [out, in/block]); each block's scale is fixed when GPTQ reaches the
    block, from the weights as updated by then.
    """
    w = w.detach().double().clone()
    rows, cols = w.shape
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    scales = torch.zeros(rows, cols // block, dtype=torch.float64)
    for i1 in range(0, cols, lazy):
        i2 = min(i1 + lazy, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:  # a new block: its scale from the current (error-updated) weights
                g = w1[:, i:i + block]
                idx = g.abs().argmax(-1, keepdim=True)
                scales[:, col // block] = torch.gather(g, -1, idx).squeeze(-1) / -8.0
            s = scales[:, col // block]
            safe = torch.where(s == 0, torch.ones_like(s), s)
            q = torch.clamp(torch.round(w1[:, i] / safe) + 8, 0, 15)
            codes[:, col] = q.to(torch.uint8)
            deq = (q - 8) * s
            e = (w1[:, i] - deq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales.float()


def collect_hessians(model: nn.Module, seqs: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """H = sum over calibration tokens of x x^T for the input of each named linear layer (fp64 totals of fp32
    per-sequence products). Layers fed the same tensor (q/k/v, gate/up) share one product."""
    mods = dict(model.named_modules())
    hs: dict[str, torch.Tensor] = {}
    seen: dict[int, tuple] = {}  # this sequence's (input, product) by input address
    hooks = []
    for n in names:
        def hook(_m, args, n=n):
            x = args[0].detach()
            key = x.data_ptr()
            if key not in seen or seen[key][0] is not x:
                x2 = x.reshape(-1, x.shape[-1]).float()
                # the input is kept referenced, so its address cannot be reused by another tensor this forward
                seen[key] = (x, (x2.T @ x2).double())
            prod = seen[key][1]
            hs[n] = hs[n] + prod if n in hs else prod.clone()
        hooks.append(mods[n].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for i in range(len(seqs)):
                seen.clear()
                model(input_ids=seqs[i:i + 1], use_cache=False)
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


def apply_gptq(fp32_onnx: Path, int4_onnx: Path, model: nn.Module, calib: torch.Tensor, block: int) -> dict:
    """Replace the 4-bit RTN weights of ``int4_onnx`` (made from ``fp32_onnx`` by onnxruntime) with GPTQ's,
    computed on ``model`` (the same weights in PyTorch) with the calibration sequences ``calib``; in place."""
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
        if attrs.get("bits") != 4 or attrs.get("block_size") != block or len(node.input) > 3:
            continue  # 8-bit head, other block sizes, asymmetric (zero points): left as they are
        b_name, s_name = node.input[1], node.input[2]
        base = b_name[: -len("_Q4")] if b_name.endswith("_Q4") else None
        if base in wanted:
            targets.append((wanted[base], b_name, s_name, attrs["N"], attrs["K"]))
    hs = collect_hessians(model, calib, sorted({t[0] for t in targets}))
    mods = dict(model.named_modules())
    changed, before, after = 0, [], []
    for mod_name, b_name, s_name, n, k in targets:
        w = mods[mod_name].weight.detach().float()
        codes, scales = gptq(w, hs[mod_name], block)
        # the RTN blob onnxruntime wrote must decode to our RTN: the layout is understood, or we stop
        blob = numpy_helper.to_array(inits[b_name])
        rtn_codes, rtn_scales = rtn_grid(w, block)
        if not np.array_equal(unpack(blob, n, k), rtn_codes.numpy()):
            raise RuntimeError(f"MatMulNBits layout of {b_name} is not the one expected; GPTQ not applied")
        x_h = hs[mod_name].float()
        for tag, c, s in (("rtn", rtn_codes, rtn_scales), ("gptq", codes, scales)):
            d = dequantize(c, s, block) - w
            (before if tag == "rtn" else after).append(float(torch.einsum("oi,ij,oj->", d, x_h, d)))
        inits[b_name].CopyFrom(numpy_helper.from_array(pack(codes.numpy(), block).reshape(blob.shape), b_name))
        old_s = numpy_helper.to_array(inits[s_name])
        inits[s_name].CopyFrom(numpy_helper.from_array(scales.numpy().astype(old_s.dtype).reshape(old_s.shape), s_name))
        changed += 1
    onnx.save_model(q, str(int4_onnx))
    ratio = sum(after) / max(sum(before), 1e-30)
    return {"method": "gptq", "layers": changed, "calibration_tokens": int(calib.numel()),
            "output_error_vs_rtn": round(ratio, 4), "seconds": round(time.perf_counter() - start, 1),
            "note": "output error = sum over layers of tr(dW H dW^T), GPTQ relative to round-to-nearest"}


def calibration_sequences(tokenizer, data: str | None, n: int = 64, seq_len: int = 512) -> torch.Tensor:
    """Calibration text from the *training* split (the parity report uses the validation split)."""
    from qtrain.data.corpus import load_corpus

    train_docs, _, _ = load_corpus(data)
    ids: list[int] = []
    for doc in train_docs:
        ids += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= n * seq_len:
            break
    rows = max(1, min(n, len(ids) // seq_len))
    if len(ids) < seq_len:
        seq_len = len(ids)
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)

