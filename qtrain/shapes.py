"""Model shapes from a config alone (no weights): the numbers the memory model and FLOP counts need.

Reads Hugging Face config dicts of the decoder families qtrain's users fine-tune (Llama, Mistral, Qwen2,
GPT-2/BigCode, CodeGen, Falcon, GPT-NeoX). ``known_models.json`` ships the config numbers of the models
the seeds and anchors talk about, so planning works offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from qtrain.errors import QtrainError
from qtrain.recipe import TARGET_PRESETS

KNOWN = Path(__file__).resolve().parent / "model_configs" / "known_models.json"


GELU_MLP_FAMILIES = ("gpt2", "gpt_bigcode", "gpt_neox", "gptj", "codegen", "falcon", "starcoder2", "phi", "opt",
                     "bloom", "mpt", "gpt_neo")


class ShapeError(QtrainError, ValueError):
    """A config qtrain cannot read; the message names what is missing."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    family: str  # model_type
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    gated_mlp: bool  # SwiGLU (3 matrices) vs GELU MLP (2)
    learned_positions: int  # rows of a learned position embedding (GPT-2 family), else 0
    qkv_bias: bool = False
    # a config's explicit head_dim (Qwen3, Gemma: heads x head_dim need not equal hidden); 0: hidden // heads
    explicit_head_dim: int = 0
    # rows of the input embedding a token can index: the tokenizer's largest id + 1 (0: unknown, all of them).
    # Vocabularies padded past the tokenizer (for matmul-friendly sizes) leave the rest unread.
    indexed_vocab: int = 0
    stored_dtype: str = ""  # the weights' dtype in the checkpoint, as the config names it ("" when unknown)
    # Soft-capped (Gemma 2) or scaled (Cohere) logits, or a forward without logits_to_keep (gpt_bigcode): the
    # fused loss cannot stand in for the head (see qtrain.loss.fused_head), so training computes the whole
    # [tokens, vocab] logits; soft-capping keeps one more such tensor for backward (tanh's output).
    fusable_head: bool = True
    head_extra_logits: int = 0
    # the config it was read from (JSON), for the activation census (qtrain.census)
    source_config: str = field(default="", compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden // self.n_heads

    @property
    def q_dim(self) -> int:
        """Width of the queries and of the attention output (hidden, unless the config sets head_dim)."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def layer_linear_params(self) -> dict[str, int]:
        """Weight elements of one decoder layer's linear maps, by role (attention / mlp)."""
        h, kv, i, q = self.hidden, self.kv_dim, self.intermediate, self.q_dim
        attn = h * (q + 2 * kv) + q * h
        mlp = (3 if self.gated_mlp else 2) * h * i
        return {"attention": attn, "mlp": mlp}

    def linear_params(self) -> int:
        """Elements of every matmul weight: layers plus LM head (a tied head is still a matmul)."""
        per = self.layer_linear_params()
        return self.n_layers * (per["attention"] + per["mlp"]) + self.vocab * self.hidden

    def total_params(self) -> int:
        """Parameter count as stored (tied LM head counted once); norms and biases included approximately."""
        emb = self.vocab * self.hidden + self.learned_positions * self.hidden
        per = self.layer_linear_params()
        norms = self.n_layers * 2 * self.hidden + self.hidden
        bias = self.n_layers * (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        head = 0 if self.tied else self.vocab * self.hidden
        return emb + self.n_layers * (per["attention"] + per["mlp"]) + norms + bias + head

    def layer_matrices(self) -> dict[str, tuple[str, int, int]]:
        """One decoder layer's linear maps under Llama's names: name -> (role, in, out). A GELU MLP has no gate."""
        h, kv, i, q = self.hidden, self.kv_dim, self.intermediate, self.q_dim
        out = {"q_proj": ("attention", h, q), "k_proj": ("attention", h, kv), "v_proj": ("attention", h, kv),
               "o_proj": ("attention", q, h)}
        if self.gated_mlp:
            out["gate_proj"] = ("mlp", h, i)
        out.update(up_proj=("mlp", h, i), down_proj=("mlp", i, h))
        return out

    def lora_matrices(self, targets: str | list[str]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The (in, out) of the matrices LoRA adapts for a preset or a list of module names: those in every
        decoder layer, and those present once (input embeddings and LM head)."""
        layer = self.layer_matrices()
        if isinstance(targets, list):
            leaves = {t.rsplit(".", 1)[-1] for t in targets}
            per_layer = [(a, b) for name, (_, a, b) in layer.items() if name in leaves]
            # names of other families (c_attn, fc1, ...) count as one hidden x hidden matrix each: the plan
            # errs toward more memory, not less
            return per_layer + [(self.hidden, self.hidden)] * len(leaves - set(layer)), []
        roles = TARGET_PRESETS[targets]
        per_layer = [(a, b) for role, a, b in layer.values() if role in roles]
        once = [(self.vocab, self.hidden), (self.hidden, self.vocab)] if "language" in roles else []
        return per_layer, once

    def lora_params(self, r: int, targets: str | list[str]) -> int:
        """LoRA A and B elements: r x (in + out) per adapted matrix."""
        per_layer, once = self.lora_matrices(targets)
        return self.n_layers * sum(r * (a + b) for a, b in per_layer) + sum(r * (a + b) for a, b in once)

    def adapted_fraction(self, targets: str | list[str]) -> float:
        """The share of a decoder layer's linear maps that LoRA adapts (4 of 7 for attention on Llama, 4 of 6 on
        a GELU MLP family)."""
        per_layer, _ = self.lora_matrices(targets)
        return min(1.0, len(per_layer) / len(self.layer_matrices()))


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


@lru_cache(maxsize=None)
def forward_keeps_logits(family: str) -> bool:
    """Whether the family's causal-LM forward takes ``logits_to_keep``, which the fused loss needs to skip the
    head (qtrain.loss.fused_head); False for a family this transformers cannot build (the planner then counts
    the whole logits, the larger)."""
    import inspect

    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        cls = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(family))]
    except (KeyError, ValueError, ImportError):
        return False
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


@lru_cache(maxsize=256)
def _head_fusable(config_json: str) -> bool | None:
    """Whether training fuses this config's LM head into the loss: qtrain.loss.fused_head asked about a one-layer
    model built on the meta device (no memory, ~0.02-1 s), so the planner and the loop decide alike (a head with
    a bias, as Phi's, soft-capped or scaled logits, a forward without logits_to_keep). None: this transformers
    cannot build the config."""
    import torch

    from qtrain.loss import fused_head

    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**json.loads(config_json))
        config.num_hidden_layers = 1
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 -- any family's constructor may refuse a config; the caller falls back
        return None
    return fused_head(model) is not None


def head_fusable(cfg: dict, family: str) -> bool:
    """Whether the fused loss stands in for the LM head of a model with config ``cfg`` (see _head_fusable); for a
    config this transformers cannot build, from the config's own flags and the family's forward."""
    built = _head_fusable(json.dumps(cfg, sort_keys=True, default=str)) if "model_type" in cfg else None
    if built is not None:
        return built
    softcap, scaled = bool(cfg.get("final_logit_softcapping")), bool(cfg.get("logit_scale"))
    return not (softcap or scaled) and forward_keeps_logits(family)


def complete_config(cfg: dict) -> dict:
    """``cfg`` with its family's defaults filled in: save_pretrained omits values equal to them (Gemma's
    config.json has no tie_word_embeddings, Gemma 2's no final_logit_softcapping). A family this transformers
    does not know keeps the file's own values."""
    try:
        from transformers import AutoConfig

        return {**AutoConfig.for_model(**cfg).to_dict(), **cfg}
    except (ValueError, KeyError, TypeError):
        return cfg


def shape_from_config(cfg: dict, name: str = "model") -> ModelShape:
    """Normalise a Hugging Face config dict into a ModelShape."""
    family = cfg.get("model_type", "unknown")
    hidden = _get(cfg, "hidden_size", "n_embd", "d_model")
    layers = _get(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(cfg, "num_attention_heads", "n_head")
    vocab = _get(cfg, "vocab_size")
    if None in (hidden, layers, heads, vocab):
        missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                                  ("num_attention_heads", heads), ("vocab_size", vocab)) if v is None]
        raise ShapeError(f"config of {name!r} ({family}) lacks {missing}; qtrain plans decoder-only transformers")
    # a two-matrix GELU MLP in these families; every other family is taken as gated (three matrices, as Llama,
    # Mistral, Qwen, Gemma, Phi-3, OLMo, Granite and BitNet's ReLU^2 gate), the larger count where unsure
    gated = family not in GELU_MLP_FAMILIES
    if family in ("gpt_bigcode",) or cfg.get("multi_query"):
        kv = 1 if cfg.get("multi_query", True) and family in ("gpt_bigcode", "falcon") else heads
        if family == "falcon" and cfg.get("new_decoder_architecture"):
            kv = cfg.get("num_kv_heads", heads)
    else:
        kv = _get(cfg, "num_key_value_heads", "num_kv_heads", default=heads)
    inter = _get(cfg, "intermediate_size", "n_inner", "ffn_hidden_size")
    if inter is None:
        inter = 4 * hidden
    learned = _get(cfg, "n_positions", default=0) if family in ("gpt2", "gpt_bigcode") else 0
    tied = bool(cfg.get("tie_word_embeddings", family in ("gpt2", "gpt_bigcode")))
    head_dim = cfg.get("head_dim")  # set only by families that read it (Llama's own configs write h / heads)
    softcap = bool(cfg.get("final_logit_softcapping"))
    return ModelShape(name=name, family=family, n_layers=int(layers), hidden=int(hidden), n_heads=int(heads),
                      n_kv_heads=int(kv), intermediate=int(inter), vocab=int(vocab), tied=tied, gated_mlp=gated,
                      learned_positions=int(learned), qkv_bias=family == "qwen2",
                      explicit_head_dim=int(head_dim) if isinstance(head_dim, int) else 0,
                      stored_dtype=str(_get(cfg, "torch_dtype", "dtype", default="")),
                      fusable_head=head_fusable(cfg, family),
                      head_extra_logits=int(softcap),
                      source_config=json.dumps(cfg, sort_keys=True, default=str))


def tokenizer_rows(model_dir: Path) -> int:
    """The largest token id + 1 of the fast tokenizer saved in ``model_dir`` (tokenizer.json: its model's
    vocabulary and the added tokens), or 0 when there is none or it cannot be read. Reads the JSON rather than
    loading the tokenizer: planning stays free of the tokenizers runtime and fast on a 150k vocabulary."""
    try:
        tok = json.loads((Path(model_dir) / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]  # Unigram: a list by id
        ids += [t["id"] for t in tok.get("added_tokens") or []]
        return max(ids) + 1 if ids else 0
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


@lru_cache(maxsize=1)
def known_models() -> dict[str, dict]:
    return json.loads(KNOWN.read_text())


def lookup_known(name: str) -> dict | None:
    """Case-insensitive match on the full hub id or on its last part (``CodeLlama-7b-hf``)."""
    table = known_models()
    low = name.lower()
    for key, cfg in table.items():
        if key.lower() == low or key.split("/")[-1].lower() == low.split("/")[-1]:
            return {"_name": key, **cfg}
    return None
