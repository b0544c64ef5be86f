"""BitNet b1.58 (Ma et al. 2024): ternary linear layers trained from a pretrained decoder, saved packed.

Forward pass of a converted layer: weights quantised per tensor by absmean to {-1, 0, 1} x (1 / scale),
activations per token by absmax to int8; backward: straight-through to the full-precision shadow weights,
which the optimizer updates. Embeddings and the LM head stay in full precision (as in the paper).

Why our own layer and not transformers' ``AutoBitLinear(online_quant=True)``: that one has no quantisation
strength, so it cannot do the gradual warmup (lambda 0 -> 1) that Hugging Face's "Fine-tuning LLMs to 1.58bit"
found necessary when converting a pretrained model, and its quantisers are ``torch.compile``d (about 20 s of
compilation per new shape on a CPU). At lambda = 1 this layer computes what ``AutoBitLinear`` does, which
tests/unit/test_bitnet.py checks on random inputs. Saving uses transformers' own ``pack_weights`` and loading its
``BitLinear`` (``AutoModelForCausalLM.from_pretrained`` on the saved directory).

Scale convention (the one transformers' ``BitLinear`` uses): ``weight_scale = 1 / mean(|W|)``, the multiplier
that maps the shadow weights onto the ternary grid; the layer computes
``y = (x_int8 @ T^T) / (x_scale * weight_scale)`` with ``x_scale = 127 / max|x|`` per token, so the
dequantised weight is ``T / weight_scale``. The saved config states it under ``qtrain_bitnet``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SCALE_CONVENTION = ("weight_scale = 1 / mean(|W|) per tensor; W_ternary = clamp(round(W * weight_scale), -1, 1); "
                    "y = (x_int8 @ W_ternary^T) / (x_scale * weight_scale), x_scale = 127 / max|x| per token")
PACK = 4  # ternary values per uint8 (transformers' VALUES_PER_ITEM)


@torch.no_grad()
def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ternary values in {-1, 0, 1} as w's dtype, the scalar weight_scale = 1 / mean|w|): transformers'
    ``WeightQuant`` arithmetic, with one weight-sized allocation (the L1 norm needs no |w| temporary)."""
    w32 = w.float()
    scale = 1.0 / (torch.linalg.vector_norm(w32, ord=1) / w32.numel()).clamp_(min=1e-5)
    return (w32 * scale).round_().clamp_(-1, 1).to(w.dtype), scale


@torch.no_grad()
def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 fake quantisation (values on the int8 grid / scale); transformers' ``ActQuant``."""
    x32 = x.float()
    scale = 127 / torch.linalg.vector_norm(x32, ord=float("inf"), dim=-1, keepdim=True).clamp_(min=1e-5)
    return (x32 * scale).round_().clamp_(-128, 127).div_(scale).to(x.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward ``x + lam * (q(x) - x)``; backward the identity (the straight-through estimator). One function
    instead of ``x + (q - x).detach()``, which allocates two more tensors of x's size per call."""

    @staticmethod
    def forward(ctx, x, lam, weight):
        if weight:
            t, scale = ternarize(x)
            q = t.div_(scale.to(t.dtype))
        else:
            q = quantize_activations(x)
        if lam < 1:
            q.sub_(x).mul_(lam).add_(x)
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class BitNetLinear(nn.Linear):
    """A linear layer whose forward pass uses ternary weights and int8 activations, blended by ``lam``.

    ``lam`` is the quantisation strength: 0 is the original layer, 1 is BitNet b1.58; in between the
    inputs are ``x + lam * (q(x) - x)`` (the blend of the warmup). Gradients pass straight through.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, use_rms_norm: bool = False,
                 rms_norm_eps: float = 1e-6, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.lam = 1.0
        self.rms_norm = None
        if use_rms_norm:
            from transformers.models.llama.modeling_llama import LlamaRMSNorm

            # the same module (and state-dict name, ``rms_norm.weight``) as transformers' BitLinear
            self.rms_norm = LlamaRMSNorm(in_features, eps=rms_norm_eps)

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_rms_norm: bool = False, rms_norm_eps: float = 1e-6) -> "BitNetLinear":
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, use_rms_norm, rms_norm_eps)
        new.weight = linear.weight  # the shadow weights are the pretrained ones (same Parameter)
        new.bias = linear.bias
        if new.rms_norm is not None:
            new.rms_norm = type(new.rms_norm)(linear.in_features, eps=rms_norm_eps).to(linear.weight)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        w = self.weight
        if self.lam > 0:
            w = _StraightThrough.apply(w, self.lam, True)
            x = _StraightThrough.apply(x, self.lam, False)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self.lam:g}, rms_norm={self.rms_norm is not None}"


def convert(model: nn.Module, use_rms_norm: bool = False, rms_norm_eps: float = 1e-6) -> tuple[list[str], list[str]]:
    """Replace every ``nn.Linear`` of ``model`` except the LM head by :class:`BitNetLinear`, in place.

    Returns (converted names, names kept in full precision and why). A layer whose output width is not a
    multiple of 4 stays full precision: the packed layout stores 4 rows per byte and transformers'
    ``BitLinear`` cannot hold the remainder.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    converted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child is head or child.out_features % PACK:
                continue
            setattr(module, child_name, BitNetLinear.from_linear(child, use_rms_norm, rms_norm_eps))
            converted.append(f"{name}.{child_name}" if name else child_name)
    if not converted:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer that BitNet can convert "
                         "(transformers' Conv1D layers of GPT-2-style models are not supported; use lora or full)")
    return converted, kept_reasons(model)


def kept_reasons(model: nn.Module) -> list[str]:
    """The linear layers of a converted model that stayed full precision besides the LM head, and why; read
    from the model itself, so nothing has to travel beside it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [f"{name} (out_features {m.out_features} is not a multiple of {PACK})" for name, m in model.named_modules()
            if type(m) is nn.Linear and m is not head and m.out_features % PACK]


def set_strength(model: nn.Module, lam: float) -> None:
    for m in model.modules():
        if isinstance(m, BitNetLinear):
            m.lam = float(lam)


def strength_at(step: int, warmup_steps: int, horizon: int) -> float:
    """Lambda for ``step`` (0-based, before the step runs): linear from 0 to 1 over ``warmup_steps``, which is
    capped at half the run's horizon so that the second half always trains the true ternary model; 1 when off."""
    if warmup_steps <= 0:
        return 1.0
    span = max(1, min(warmup_steps, horizon // 2))
    return min(1.0, step / span)


def layers(model: nn.Module) -> dict[str, BitNetLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BitNetLinear)}


def packed_state_dict(model: nn.Module, float_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The model's state dict with each ternary layer as transformers' BitLinear stores it: ``weight`` uint8
    [out/4, in] (2 bits per value, ``pack_weights``) and ``weight_scale`` [1] in fp32 (exact: it is one number
    per layer); every other floating tensor (embeddings, which are most of a small model's file once the
    layers are 2-bit, norms, biases) in ``float_dtype``. Tensors that share storage (tied embeddings) still
    share it, so they are written once."""
    from transformers.integrations.bitnet import pack_weights

    bit = layers(model)
    cast: dict[int, torch.Tensor] = {}

    def narrow(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or t.dtype == float_dtype:
            return t
        key = t.data_ptr()
        if key not in cast:
            cast[key] = t.detach().to(float_dtype)
        return cast[key]

    sd = {k: narrow(v) for k, v in model.state_dict().items()}
    for name, m in bit.items():
        t, scale = ternarize(m.weight)
        sd[f"{name}.weight"] = pack_weights(t.to(torch.int8).clone())
        sd[f"{name}.weight_scale"] = scale.reshape(1).float()
    return sd


def save_packed(model, tokenizer, out: Path, use_rms_norm: bool, rms_norm_eps: float,
                final_strength: float = 1.0, float_dtype: torch.dtype = torch.bfloat16) -> None:
    """Save ``model`` (converted with :func:`convert`) so that ``AutoModelForCausalLM.from_pretrained(out)`` loads
    it with transformers' BitNet support (``BitLinear`` modules, 2-bit packed weights). The non-ternary tensors
    are stored in ``float_dtype`` (bf16: the file is ~3.2x smaller than the bf16 model instead of ~1.9x with
    them in fp32, at the cost of rounding the embeddings and norms the training used)."""
    from transformers import BitNetQuantConfig

    out = Path(out)
    bit = layers(model)
    full_precision = [n for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and not isinstance(m, BitNetLinear)]
    qconf = BitNetQuantConfig(linear_class="bitlinear", quantization_mode="offline", use_rms_norm=use_rms_norm,
                              rms_norm_eps=rms_norm_eps, modules_to_not_convert=full_precision)
    config = model.config
    had = getattr(config, "quantization_config", None)
    config.quantization_config = qconf
    config.qtrain_bitnet = {"scale_convention": SCALE_CONVENTION, "ternary_layers": len(bit),
                            "full_precision_linear_layers": full_precision, "kept_reasons": kept_reasons(model),
                            "final_strength": final_strength,
                            "float_tensors_dtype": str(float_dtype).removeprefix("torch.")}
    try:
        model.save_pretrained(out, state_dict=packed_state_dict(model, float_dtype), safe_serialization=True)
    finally:
        if had is None:
            del config.quantization_config
        else:
            config.quantization_config = had
        del config.qtrain_bitnet
    tokenizer.save_pretrained(out)


def shadow_from_ternary(t: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Shadow weights whose absmean ternarisation gives back exactly the ternary values ``t`` and the scale
    ``weight_scale`` of a packed checkpoint: ``t / (weight_scale * p)``, p the share of non-zeros. Their mean
    |W| is 1 / weight_scale, and ``W * weight_scale = t / p`` rounds and clamps back to ``t`` (|t / p| >= 1).
    (``t / weight_scale`` would not: its mean |W| is p / weight_scale, so the scale would grow by 1 / p.)"""
    share = t.ne(0).float().mean()
    if share == 0:
        return torch.zeros_like(t)
    return t / (weight_scale.float() * share)


def from_packed(model: nn.Module) -> list[str]:
    """Replace the transformers ``BitLinear`` layers of a loaded packed checkpoint (a qtrain run, BitNet b1.58
    2B4T, Falcon-E) by trainable :class:`BitNetLinear` layers that compute the same forward at strength 1, in
    place; returns their names. Full ternary QAT trains these shadow weights; LoRA keeps them frozen."""
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear, unpack_weights

    unpack = getattr(unpack_weights, "_torchdynamo_orig_callable", unpack_weights)
    names = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, AutoBitLinear):
                raise ValueError(f"{full} is transformers' AutoBitLinear (linear_class='autobitlinear'); qtrain "
                                 "fine-tunes checkpoints in the packed 'bitlinear' layout only")
            if not isinstance(child, BitLinear):
                continue
            norm = child.rms_norm
            new = BitNetLinear(child.in_features, child.out_features, child.bias is not None,
                               use_rms_norm=norm is not None, rms_norm_eps=getattr(norm, "variance_epsilon", 1e-6))
            t = unpack(child.weight, dtype=torch.float32)[: child.out_features]
            with torch.no_grad():
                new.weight.copy_(shadow_from_ternary(t, child.weight_scale))
                if child.bias is not None:
                    new.bias.copy_(child.bias.float())
                if norm is not None:
                    new.rms_norm.weight.copy_(norm.weight.float())
            setattr(module, child_name, new)
            names.append(full)
    if not names:
        raise ValueError(f"{type(model).__name__} has no BitLinear layer: it is not a packed BitNet checkpoint")
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        # the layers are trainable modules now; saving writes the quantization config afresh (save_packed)
        del config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(config, "qtrain_bitnet"):
        del config.qtrain_bitnet
    return names


def has_rms_norm(model: nn.Module) -> bool:
    return any(m.rms_norm is not None for m in layers(model).values())


def is_bitnet_config(config) -> bool:
    q = getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return getattr(method, "value", method) == "bitnet"


def is_bitnet_dir(path: Path) -> bool:
    import json

    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    q = json.loads(cfg.read_text()).get("quantization_config") or {}
    return q.get("quant_method") == "bitnet"


def load_packed(path: str | Path, compile_kernels: bool | None = None):
    """Load a saved BitNet model with transformers (``BitLinear`` layers). On a CPU transformers' unpacking and
    activation quantisation are ``torch.compile``d, which costs ~20 s per new shape here; ``compile_kernels=None``
    turns that off on a CPU (eager is the same arithmetic) unless ``QTRAIN_BITNET_COMPILE=1``."""
    from transformers import AutoModelForCausalLM

    if compile_kernels is None:
        import os

        compile_kernels = torch.cuda.is_available() or os.environ.get("QTRAIN_BITNET_COMPILE") == "1"
    if not compile_kernels:
        _eager_bitlinear()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def _eager_bitlinear() -> None:
    """Run transformers' BitLinear without torch.compile (same operations, no compilation per shape)."""
    from transformers.integrations import bitnet as hf

    for fn in ("unpack_weights",):
        f = getattr(hf, fn)
        if hasattr(f, "_torchdynamo_orig_callable"):
            setattr(hf, fn, f._torchdynamo_orig_callable)
    for cls, names in ((hf.BitLinear, ("activation_quant", "post_quant_process")),
                       (hf.WeightQuant, ("forward",)), (hf.ActQuant, ("forward",))):
        for n in names:
            f = cls.__dict__[n]
            wrap = staticmethod if isinstance(f, staticmethod) else (lambda g: g)
            f = f.__func__ if isinstance(f, staticmethod) else f
            if hasattr(f, "_torchdynamo_orig_callable"):
                setattr(cls, n, wrap(f._torchdynamo_orig_callable))


def dequantized(model: nn.Module) -> tuple[nn.Module, set[str]]:
    """Replace transformers' ``BitLinear`` layers by ``nn.Linear`` holding ``T / weight_scale`` (fp32), in place;
    returns the model and the state-dict names of the ternary weights. Activation quantisation is dropped, so
    this is the weight side only (what a GGUF file stores)."""
    from transformers.integrations.bitnet import BitLinear, unpack_weights

    unpack = getattr(unpack_weights, "_torchdynamo_orig_callable", unpack_weights)
    names = set()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BitLinear):
                if child.rms_norm is not None:
                    raise ValueError("this BitNet model normalises activations inside each ternary layer "
                                     "(bitnet_rms_norm); GGUF's llama layout cannot express that")
                full = f"{name}.{child_name}" if name else child_name
                t = unpack(child.weight, dtype=torch.float32)[: child.out_features]
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(t / child.weight_scale.float())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(module, child_name, lin)
                names.add(f"{full}.weight")
    return model, names
