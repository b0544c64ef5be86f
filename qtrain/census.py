"""What one decoder layer saves for backward, read from the model's own code rather than a family's formula.

The planner's hand-written census (plan.layer_activation_bytes) is exact for the Llama family it was written
from, but a family it never saw can save more: Qwen3 and OLMo2 normalise queries and keys, Granite and Phi-3
are gated where a name-based guess said GELU, GPT-NeoX keeps fewer tensors than a gated MLP. Measured per layer
on 1-layer minus 2-layer models at small widths, the formula was off by -34% to +19% on such families.

So, for a config transformers can build, the bytes autograd saves in one layer are counted (saved-tensor hooks,
parameters excluded) on small models built from the user's own config with the widths replaced, and fitted
as a linear function of the widths and the sequence:

    bytes(layer) = s * (a.h + b.q + c.kv + d.i + e.heads + f) + g.heads.s^2 + k.h + l
                   (s positions, per sequence; k.h + l once per layer, whatever the batch)

(q = heads x head_dim; the s^2 term is attention probabilities, which eager attention keeps and SDPA does not;
the last two are tensors of weight size a layer computes, such as Gemma's 1 + norm gain).
The fit must be exact on every probe (a linear model of saved tensors is exact when the layer's code is width-
generic) and on a check at widths, a sequence and a micro-batch no probe used; otherwise, or when the family cannot be built offline, the caller keeps its formula. Costs about a
second per (config, method) on a CPU, cached for the process.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache

log = logging.getLogger(__name__)

# (hidden, heads, kv heads, head_dim, intermediate) probes: each varies one width from the first; the last
# varies all, as a check of the fit
PROBES = [(64, 4, 2, 16, 96), (96, 4, 2, 16, 96), (64, 4, 2, 24, 96), (64, 4, 4, 16, 96), (64, 8, 2, 16, 96),
          (64, 4, 2, 16, 160), (128, 8, 4, 16, 224)]
SEQS = (8, 16)
# a check the fit must pass besides: other widths, a sequence and a micro-batch of 2 no probe used
CHECK = ((80, 4, 2, 20, 136), 12, 2)
FIT_TOLERANCE = 0.01  # relative residual on any probe above which the fit is refused
# config keys a probe overrides, by the names families use for them
_WIDTH_KEYS = {"hidden": ("hidden_size", "n_embd", "d_model"), "heads": ("num_attention_heads", "n_head"),
               "kv": ("num_key_value_heads", "num_kv_heads"), "inter": ("intermediate_size", "n_inner", "ffn_hidden_size"),
               "layers": ("num_hidden_layers", "n_layer", "num_layers")}
_DROP = ("architectures", "auto_map", "quantization_config", "_name_or_path", "transformers_version", "torch_dtype",
         "dtype", "_name", "rope_scaling", "layer_types", "sliding_window", "max_window_layers",
         # nothing a layer saves depends on these; dropping them lets models of one family share a census
         "max_position_embeddings", "n_positions", "n_ctx", "rope_theta", "initializer_range", "use_cache",
         "bos_token_id", "eos_token_id", "pad_token_id", "vocab_size", "tie_word_embeddings")


def _probe_config(config: dict, h: int, heads: int, kv: int, head_dim: int, inter: int, layers: int) -> dict:
    cfg = {k: v for k, v in config.items() if k not in _DROP}
    for role, value in (("hidden", h), ("heads", heads), ("kv", kv), ("inter", inter), ("layers", layers)):
        keys = [k for k in _WIDTH_KEYS[role] if config.get(k) is not None]
        if role == "kv" and not keys:
            continue  # the family has no KV-head setting (multi-head or multi-query by design)
        for key in keys or _WIDTH_KEYS[role][:1]:
            cfg[key] = value
    if isinstance(config.get("head_dim"), int):  # only where the family reads it; else head_dim = h / heads
        cfg["head_dim"] = head_dim
    cfg["vocab_size"] = 128
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # a family's default id may exceed 128 rows
        cfg[key] = 0
    if config.get("multi_query") is not None:
        cfg["multi_query"] = config["multi_query"]
    return cfg


def _layer_saved_bytes(config: dict, seqs: tuple[int, ...], method: str, lora_r: int, lora_dropout: float,
                       targets, batch: int = 1) -> list[tuple[int, int]]:
    """Bytes the second decoder layer of a 2-layer model built from ``config`` saves for backward, one forward
    per sequence length, as (bytes of float tensors, bytes of one-byte tensors such as dropout masks): new
    storages only (what the first layer or the model body already saved, such as the
    rotary tables, is shared), parameters excluded -- the 2-layer minus 1-layer difference, from one model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtrain.methods import prepare_model
    from qtrain.recipe import Recipe

    cfg = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    except (ValueError, ImportError):  # a family without SDPA trains with its eager attention
        model = AutoModelForCausalLM.from_config(cfg)
    model = prepare_model(model, Recipe(method=method, lora_r=lora_r, lora_dropout=lora_dropout,
                                        target_modules=targets))
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = next(m for m in base.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 2)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    state = {"layer": None, "seen": set(), "wide": 0, "narrow": 0}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in state["seen"]:
            state["seen"].add(st.data_ptr())
            if state["layer"] == 1:
                state["wide" if t.element_size() > 1 else "narrow"] += st.nbytes()
        return t

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, i=i: state.update(layer=i))
        layer.register_forward_hook(lambda *_: state.update(layer=None))
    body = getattr(base, base.base_model_prefix, base)
    out = []
    for seq in seqs:
        state.update(layer=None, seen=set(), wide=0, narrow=0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            body(input_ids=torch.randint(0, 128, (batch, seq)))
        out.append((state["wide"], state["narrow"]))
    return out


@lru_cache(maxsize=128)
def layer_coefficients(config_json: str, method: str, lora_r: int, lora_dropout: float,
                       targets: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Bytes one layer saves in fp32 float tensors and in one-byte tensors, each as coefficients of
    (s.h, s.q, s.kv, s.i, s.heads, s, heads.s^2, h, 1); None when the family cannot be built here or its saved
    tensors are not linear in the widths."""
    import numpy as np

    from qtrain.shapes import shape_from_config

    config = json.loads(config_json)
    targets_arg = json.loads(targets)
    rows, ys = [], []
    try:
        for h, heads, kv, head_dim, inter in PROBES:
            two = _probe_config(config, h, heads, kv, head_dim, inter, 2)
            s = shape_from_config(two)  # the widths the family honoured (some ignore head_dim or kv heads)
            for seq, y in zip(SEQS, _layer_saved_bytes(two, SEQS, method, lora_r, lora_dropout, targets_arg)):
                rows.append([seq * s.hidden, seq * s.q_dim, seq * s.kv_dim, seq * s.intermediate, seq * s.n_heads,
                             seq, s.n_heads * seq * seq, s.hidden, 1])
                ys.append(y)
    except Exception as e:  # any family-specific failure: the caller keeps its formula
        log.debug("activation census of %s failed: %r", config.get("model_type"), e)
        return None
    a = np.array(rows, dtype=float)
    fits = []
    for y in np.array(ys, dtype=float).T:  # float bytes, then one-byte bytes
        coef = np.linalg.lstsq(a, y, rcond=None)[0]
        worst = float(np.max(np.abs(a @ coef - y) / np.maximum(y, 1)))
        if worst > FIT_TOLERANCE:
            log.debug("activation census of %s is not linear in the widths (residual %.1f%%)",
                      config.get("model_type"), 100 * worst)
            return None
        fits.append(tuple(float(c) for c in coef))
    (h, heads, kv, head_dim, inter), seq, batch = CHECK
    try:
        probe = _probe_config(config, h, heads, kv, head_dim, inter, 2)
        measured = _layer_saved_bytes(probe, (seq,), method, lora_r, lora_dropout, targets_arg, batch)[0]
    except Exception as e:  # noqa: BLE001 -- as above
        log.debug("activation census check of %s failed: %r", config.get("model_type"), e)
        return None
    s = shape_from_config(probe)
    for fit, got in zip(fits, measured):
        want = _bytes(fit, s, seq, batch)
        if abs(want - got) > FIT_TOLERANCE * max(got, 1):
            log.debug("activation census of %s misses its check (%d vs %d bytes)", config.get("model_type"), want, got)
            return None
    return fits[0], fits[1]


def _bytes(c: tuple[float, ...], shape, seq: int, micro_batch: int) -> float:
    per_token = (c[0] * shape.hidden + c[1] * shape.q_dim + c[2] * shape.kv_dim + c[3] * shape.intermediate
                 + c[4] * shape.n_heads + c[5])
    return micro_batch * (seq * per_token + c[6] * shape.n_heads * seq * seq) + c[7] * shape.hidden + c[8]


def census_layer_bytes(shape, method: str, lora_r: int, lora_dropout: float, targets, seq: int, micro_batch: int,
                       dtype_bytes: int) -> int | None:
    """Bytes one layer of ``shape`` saves for ``micro_batch`` sequences of ``seq`` positions, in a compute dtype
    of ``dtype_bytes`` (the census runs in fp32 and scales its float tensors, as the formula does; masks stay one
    byte); None without a census."""
    if not shape.source_config:
        return None
    structure = _probe_config(json.loads(shape.source_config), 0, 0, 0, 0, 0, 0)  # widths out: the cache key
    coef = layer_coefficients(json.dumps(structure, sort_keys=True), method, lora_r, lora_dropout, json.dumps(targets))
    if coef is None:
        return None
    return max(0, int(round(_bytes(coef[0], shape, seq, micro_batch) * dtype_bytes / 4
                            + _bytes(coef[1], shape, seq, micro_batch))))
