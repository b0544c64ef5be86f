"""Prepare a loaded model for a fine-tuning method. Methods change how the model is prepared, not the loop."""

from __future__ import annotations

import logging

import torch
from torch import nn

from qtrain.recipe import TARGET_PRESETS, Recipe, RecipeError

log = logging.getLogger(__name__)

_ATTN_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h")


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2, SantaCoder) is a linear layer with transposed weights; peft handles it.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def classify_modules(model: nn.Module) -> dict[str, list[str]]:
    """Full names of the model's linear and embedding layers by role: attention, mlp, language, other."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    roles: dict[str, list[str]] = {"attention": [], "mlp": [], "language": [], "other": []}
    for name, module in model.named_modules():
        if module is out_emb or module is in_emb:
            roles["language"].append(name)
        elif _is_linear(module):
            parts = name.lower().split(".")
            if any(w in p for p in parts for w in _ATTN_WORDS):
                roles["attention"].append(name)
            elif any(w in p for p in parts for w in _MLP_WORDS):
                roles["mlp"].append(name)
            else:
                roles["other"].append(name)
    return roles


def _compact(names: list[str], roles: dict[str, list[str]]) -> list[str]:
    """Shorten full module names to their last component where that is unambiguous (peft matches suffixes)."""
    chosen = set(names)
    all_names = [n for ns in roles.values() for n in ns]
    out: set[str] = set()
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        if all(m in chosen for m in all_names if m.rsplit(".", 1)[-1] == leaf):
            out.add(leaf)
        else:
            out.add(n)
    return sorted(out)


def resolve_target_modules(model: nn.Module, spec: str | list[str]) -> list[str] | str:
    """Turn a preset (attention, mlp, language, attention+mlp, all-linear, all) or a list into peft targets."""
    roles = classify_modules(model)
    if isinstance(spec, list):
        known = {n.rsplit(".", 1)[-1] for ns in roles.values() for n in ns} | {n for ns in roles.values() for n in ns}
        unknown = [s for s in spec if s not in known]
        if unknown:
            raise RecipeError(f"target_modules {unknown} match no linear or embedding layer of this model; "
                              f"its layers are named {sorted({n.rsplit('.', 1)[-1] for ns in roles.values() for n in ns})}")
        return spec
    names = [n for role in TARGET_PRESETS[spec] for n in roles[role]]
    if not names:
        raise RecipeError(f"target_modules preset {spec!r} matches no layer of this model "
                          f"({type(model).__name__}); name the modules explicitly as a list")
    return _compact(names, roles)


def quantization_config(recipe: Recipe, device_type: str):
    """bitsandbytes NF4 with double quantisation for QLoRA (Dettmers et al. 2023); None for other methods.

    Compute dtype per device: bf16 on CUDA, fp32 on CPU (bitsandbytes >= 0.49 runs 4-bit on CPU; bf16
    matmuls are slow on CPUs without native bf16).
    """
    if recipe.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if device_type == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)


def keep_4bit_differentiable(model: nn.Module) -> int:
    """Keep gradients flowing through the frozen 4-bit base layers on a CPU; returns how many layers were set.

    bitsandbytes (0.49-0.50) repacks a ``Linear4bit`` weight for its AVX512-BF16 CPU inference kernel the first
    time the layer runs in eval mode without grad (qtrain's validation before training does), and every later
    forward, in training too, then takes that kernel, which autograd cannot see through: the input gradient
    through the frozen weights is silently dropped and only the adapters' own paths and the residual stream carry
    gradient down. Measured on this project's AVX512-BF16 CPU: QLoRA "trained" at 215 tokens/s against LoRA's 163
    with fewer matmuls in backward, and a higher validation loss. The repack is skipped by the module's own switch.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


class _QuietInt8Cast(logging.Filter):
    """bitsandbytes logs "inputs will be cast from float32 to float16" on every int8 matmul call: hundreds of
    lines per teacher forward. The cast is the method (LLM.int8() quantises activations from fp16), not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


_QUIET_INT8_CAST = _QuietInt8Cast()  # one instance: Logger.addFilter skips a filter it already holds


def quantize_frozen_linears(model: nn.Module, kind: str, device: torch.device) -> int:
    """Hold a frozen model's linear layers (a distillation teacher's) in bitsandbytes ``int8`` (LLM.int8(): row-wise
    absmax, outlier columns above 6.0 kept in fp16) or ``nf4`` (QLoRA's, double-quantised), in place; returns how
    many layers were replaced. Embeddings and the LM head stay as they are: the fused distillation loss multiplies
    the teacher's last hidden states by the head's weight itself. Layers are swapped one at a time, so the model's
    float copy is given back layer by layer. Compute runs in bf16 on CUDA and fp32 on a CPU (as QLoRA's)."""
    import bitsandbytes as bnb

    if kind not in ("int8", "nf4"):
        raise ValueError(f"quantize_frozen_linears: kind {kind!r} is not int8 or nf4")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
             and type(m).__name__ not in ("Linear4bit", "Linear8bitLt")]
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_QUIET_INT8_CAST)
    for name in names:
        old = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        bias = old.bias is not None
        weight = old.weight.data.detach().to("cpu", torch.float32)
        if kind == "nf4":
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=bias, compute_dtype=compute,
                                    quant_type="nf4", compress_statistics=True, device="meta")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        else:
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=bias, has_fp16_weights=False,
                                      threshold=6.0, device="meta")
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if bias:
            new.bias = nn.Parameter(old.bias.data.detach().to("cpu", compute), requires_grad=False)
        new = new.to(device)  # quantises here
        new.requires_grad_(False)
        new.eval()
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        del old, weight
    return len(names)


def checkpointing_takes_effect(model: nn.Module) -> bool:
    """Whether transformers' ``gradient_checkpointing_enable`` changes anything for this model. Some families
    accept the call and ignore it: in transformers 4.57 gpt_bigcode (StarCoder 1, TinyStarCoder) sets the flag
    on a model whose blocks never read it, so a checkpointed run kept every layer's activations (found by
    benchmarks/plan_heldout.py: 0.26 GiB more peak RSS on a 6-layer model than once checkpointed)."""
    import inspect

    from transformers.modeling_layers import GradientCheckpointingLayer

    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            return True
        if getattr(m, "gradient_checkpointing", False):
            try:
                if "_gradient_checkpointing_func" in inspect.getsource(type(m).forward):
                    return True
            except (OSError, TypeError):  # no source to read: trust the flag
                return True
    return False


def decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The repeated decoder blocks: the longest ModuleList whose entries are all of one class."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(b) for b in m}) == 1]
    return max(lists, key=len, default=None)


def checkpoint_blocks_if_ignored(model: nn.Module) -> int:
    """Make gradient checkpointing real where the model's own code ignores it (see checkpointing_takes_effect):
    each decoder block's forward runs under torch.utils.checkpoint (non-reentrant, as transformers does), so
    only its inputs are saved and it is recomputed in backward. The blocks stay where they are, so parameter
    names, state dicts and peft's targets are unchanged (torch's checkpoint_wrapper would rename them).
    Returns the number of blocks wrapped (0: the model's own checkpointing works)."""
    if checkpointing_takes_effect(model):
        return 0
    from torch.utils.checkpoint import checkpoint

    blocks = decoder_blocks(model)
    if blocks is None:
        log.warning("%s ignores gradient checkpointing and has no block list to checkpoint; it runs without",
                    type(model).__name__)
        return 0
    for block in blocks:
        def run(*args, _forward=block.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = run
    log.info("%s ignores transformers' gradient checkpointing; checkpointing its %d blocks with torch's",
             type(model).__name__, len(blocks))
    return len(blocks)


def prepare_model(model: nn.Module, recipe: Recipe, new_token_ids: list[int] | None = None) -> nn.Module:
    """Return the model ready to train with ``recipe.method``; only the trainable parameters require grad."""
    if recipe.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads, and is what
        # PyTorch recommends; the reentrant variant is being deprecated.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        checkpoint_blocks_if_ignored(model)
    if recipe.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if recipe.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if recipe.method == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=recipe.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
            keep_4bit_differentiable(model)
        targets = resolve_target_modules(model, recipe.target_modules)
        extra = {}
        if new_token_ids:
            # New special tokens (FIM) need trained embedding rows; peft trains just those rows.
            emb_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings()).rsplit(".", 1)[-1]
            if isinstance(targets, list) and emb_name in targets:
                log.info("embeddings carry LoRA already; new token rows are trained through it")
            else:
                extra["trainable_token_indices"] = {emb_name: list(new_token_ids)}
        config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                            target_modules=targets, bias="none", task_type="CAUSAL_LM", **extra)
        model = get_peft_model(model, config)
        use_fast_dropout(model)
        return model
    if recipe.method == "bitnet":
        from qtrain import bitnet

        if bitnet.layers(model):  # a ternary checkpoint unpacked by bitnet.from_packed: QAT continues from it
            log.info("bitnet: training the %d ternary layers of a packed checkpoint", len(bitnet.layers(model)))
        else:
            try:
                converted, kept = bitnet.convert(model, recipe.bitnet_rms_norm,
                                                 getattr(model.config, "rms_norm_eps", 1e-6))
            except ValueError as exc:
                raise RecipeError(f"method=bitnet: {exc}") from None
            log.info("bitnet: %d linear layers made ternary; kept in full precision: %s", len(converted),
                     ", ".join(kept) or "none besides the LM head")
        # every parameter trains: the ternary layers' full-precision shadow weights, embeddings and norms
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    raise RecipeError(f"method {recipe.method!r} is not available in this version of qtrain; "
                      "use full, lora, qlora or bitnet")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        # bitsandbytes 4-bit weights store 2 values per byte in a uint8 tensor
        if p.dtype == torch.uint8 and hasattr(p, "quant_state"):
            n *= 2
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask shaped like ``x`` and the matching inverse-keep scale.

    Draws 64 random bits per 4 elements and compares 16-bit words against a threshold, so the drop
    probability is ``p`` rounded to a multiple of 1/65536 (0.05 -> 0.049988); the scale uses that rounded
    value, so the layer stays unbiased. ``torch.rand_like`` draws one float per element and is ~3x slower.
    """
    n = x.numel()
    k = round(p * 65536)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2 ** 63), None)
    keep = words.view(torch.int16)[:n].view(x.shape) >= (k - 32768)
    return keep, 1.0 / (1.0 - k / 65536)


class _Dropout(torch.autograd.Function):
    # Saves the boolean mask (1 byte per element, as autograd does for ``x * mask * scale``) and multiplies in
    # place; a saved fp32 (mask x scale) tensor would be ~20% faster here but cost 4 bytes per element.
    @staticmethod
    def forward(ctx, x, p):
        keep, scale = _keep_mask(x, p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


class FastDropout(nn.Module):
    """Inverted dropout with a cheaper mask than ``nn.Dropout`` (see :func:`_keep_mask`).

    Each element is kept with probability 1 - p (p rounded to 1/65536) and scaled by 1 / (1 - p).
    peft's LoRA dropout runs on every adapted layer's input; with ``nn.Dropout`` (``bernoulli_``) it took
    ~13% of a LoRA step for SmolLM2-135M on this CPU (torch profiler), ~1.6 ms per 512x576 input forward
    + backward; this takes ~0.6 ms, with the same saved-mask memory.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or round(self.p * 65536) == 0:
            return x
        return _Dropout.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module) -> int:
    """Swap peft's LoRA ``nn.Dropout`` modules for :class:`FastDropout`; returns how many were swapped."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for key, d in list(drops.items()):
                if type(d) is nn.Dropout and d.p > 0:
                    drops[key] = FastDropout(d.p)
                    n += 1
    return n
