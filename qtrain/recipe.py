"""The recipe: one typed schema for everything a training run needs to know.

A recipe is data. YAML files in ``recipes/`` supply values, ``key=value`` on the command line
overrides them, and anything that is not a field of :class:`Recipe` (or has the wrong type) is an
error that names the key: a misspelled ``lora_rnak: 8`` must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from qtrain.errors import QtrainError

Method = Literal["full", "lora", "qlora", "bitnet"]
DataFormat = Literal["auto", "code", "text", "alpaca", "chat"]
InstructionTemplate = Literal["auto", "chat", "alpaca"]
FimMode = Literal["psm", "spm", "mixed"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]
Dtype = Literal["float32", "bfloat16", "float16"]
BitnetStart = Literal["absmean", "gptq"]
TeacherDtype = Literal["float32", "bfloat16", "float16", "int8", "nf4"]

# Target-module presets of the full-vs-LoRA trade-off study of small code models ("Attention Modules", "Fully Connected Module",
# "Language Feature Modules") plus the usual all-linear. Resolved against the real module names of
# the loaded model in qtrain.methods, so they work for any decoder architecture.
# LoRA target presets: the module roles each adapts (roles as methods.classify_modules names them). The one
# table that the recipe check, the model preparation (methods) and the planner's counts (shapes, plan) read.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("attention",),
    "mlp": ("mlp",),
    "language": ("language",),  # input embeddings and LM head
    "attention+mlp": ("attention", "mlp"),
    "all-linear": ("attention", "mlp", "other"),
    "all": ("attention", "mlp", "other", "language"),
}


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class RecipeError(QtrainError, ValueError):
    """A recipe value is wrong; the message names the key and the way out."""


@dataclass
class Recipe:
    """Everything that decides what a run does. Units are in the names where a number has one."""

    name: str = "custom"
    method: Method = "lora"
    # model / numerics
    dtype: Dtype = "float32"
    gradient_checkpointing: bool = False
    # LM head + cross-entropy in chunks, never materialising [tokens, vocab] logits (qtrain/loss.py)
    fused_cross_entropy: bool = True
    # data
    data_format: DataFormat = "auto"
    # how instruction records (chat, prompt/completion, Alpaca) become text: the tokenizer's chat template, which
    # is how `qtrain eval` and `qtrain serve` prompt an instruct model, or the Alpaca template; auto = chat where
    # the tokenizer has a template
    instruction_template: InstructionTemplate = "auto"
    seq_len: int = 512
    val_fraction: float = 0.05
    val_max_sequences: int = 32
    # the validation sequences' length (None: seq_len). Fixed, it scores runs trained at different seq_len on the
    # same split. The planner counts training, not evaluation: a no-grad forward at a val_seq_len far above
    # seq_len can need more memory than a training step.
    val_seq_len: int | None = None
    extensions: list[str] | None = None
    min_file_bytes: int = 64
    max_file_bytes: int = 1_000_000
    near_dup_threshold: float = 0.85
    fim_rate: float = 0.0
    fim_mode: FimMode = "mixed"
    # batch and schedule
    micro_batch_size: int = 1
    grad_accum_steps: int = 8
    max_steps: int = 100
    learning_rate: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: Optimizer = "adamw"
    seed: int = 0
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    # BitNet b1.58 (qtrain/bitnet.py): quantisation strength lambda rises linearly from 0 to 1 over this many
    # steps (capped at half the run; 0 = ternary from the first step), and optional RMSNorm before each
    # ternary layer's activation quantisation
    bitnet_warmup_steps: int = 0
    bitnet_rms_norm: bool = False
    # Where the ternary layers start (qtrain/bitnet_gptq.py): "absmean" rounds each pretrained weight to the
    # nearest of {-1, 0, 1} x mean|W| (the paper's); "gptq" rounds with error compensation, calibrated block by
    # block on the first bitnet_calib_sequences training sequences (one scale per tensor either way, so the
    # saved formats are the same). Ignored when the model is already ternary (a packed checkpoint).
    bitnet_start: BitnetStart = "absmean"
    bitnet_calib_sequences: int = 16
    # Knowledge distillation from the model as it was before training (the frozen teacher): the objective is
    # (1 - distill_weight) * cross-entropy + distill_weight * T^2 * KL(teacher || student) at temperature
    # T = distill_temperature, per target token (qtrain/loss.py). 0 = off. The teacher costs its weights in
    # distill_teacher_dtype and one forward pass per micro-batch (about a third of a full fine-tuning step).
    # int8 and nf4 hold its linear layers in bitsandbytes' formats (methods.quantize_frozen_linears); its
    # embeddings and LM head stay fp32 (bf16 on CUDA).
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    distill_teacher_dtype: TeacherDtype = "float32"
    # Under several processes (accelerate launch): shard weights, gradients and optimizer states across them
    # (FSDP2 through accelerate) instead of holding a replica on each (DDP). What lets a run that one device cannot
    # hold train on several; it costs an all-gather of each layer's weights per forward and backward.
    fsdp: bool = False
    # bookkeeping
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 50

    def __post_init__(self) -> None:
        _check_types(self)
        positive = ("seq_len", "micro_batch_size", "grad_accum_steps", "max_steps", "val_max_sequences",
                    "lora_r", "log_every", "max_file_bytes", "bitnet_calib_sequences")
        for key in positive:
            if getattr(self, key) <= 0:
                raise RecipeError(f"recipe key '{key}' must be > 0, got {getattr(self, key)!r}")
        for key in ("warmup_steps", "bitnet_warmup_steps", "eval_every", "save_every", "min_file_bytes", "weight_decay", "max_grad_norm"):
            if getattr(self, key) < 0:
                raise RecipeError(f"recipe key '{key}' must be >= 0, got {getattr(self, key)!r}")
        if self.val_seq_len is not None and self.val_seq_len <= 0:
            raise RecipeError(f"recipe key 'val_seq_len' must be > 0 (or null for seq_len), got {self.val_seq_len!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise RecipeError(f"recipe key 'val_fraction' must be between 0 and 1 (exclusive), got {self.val_fraction!r}")
        for key in ("fim_rate", "lora_dropout", "min_lr_ratio", "distill_weight"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise RecipeError(f"recipe key '{key}' must be between 0 and 1, got {getattr(self, key)!r}")
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise RecipeError(f"recipe key 'near_dup_threshold' must be in (0, 1], got {self.near_dup_threshold!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise RecipeError(f"recipe key 'learning_rate' must be a positive number, got {self.learning_rate!r}")
        floats = [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), float)]
        bad = [k for k in floats if not math.isfinite(getattr(self, k))]
        if bad:
            raise RecipeError(f"recipe key '{bad[0]}' must be a finite number, got {getattr(self, bad[0])!r}")
        if not self.distill_temperature > 0:
            raise RecipeError(f"recipe key 'distill_temperature' must be > 0, got {self.distill_temperature!r}")
        if self.distill_weight > 0 and self.method != "bitnet":
            raise RecipeError(f"recipe key 'distill_weight' is {self.distill_weight!r} with method={self.method}: "
                              "distillation from the model before training is for method=bitnet (the teacher is "
                              "the full-precision model); set distill_weight=0 or method=bitnet")
        if self.fsdp and self.method not in ("full", "lora"):
            raise RecipeError(f"recipe key 'fsdp' is true with method={self.method}: sharding is written for full "
                              "and lora; set fsdp=false (DDP replicates the model on each device) or use one of those")
        if self.min_file_bytes >= self.max_file_bytes:
            raise RecipeError(
                f"recipe key 'min_file_bytes' ({self.min_file_bytes}) must be below 'max_file_bytes' ({self.max_file_bytes})")
        if isinstance(self.target_modules, str) and self.target_modules not in TARGET_PRESETS:
            raise RecipeError(
                f"recipe key 'target_modules' is {self.target_modules!r}: use one of {', '.join(TARGET_PRESETS)} "
                "or a list of module names")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise RecipeError("recipe key 'target_modules' is an empty list: name at least one module or a preset")
        if self.extensions is not None:
            self.extensions = [e if e.startswith(".") else "." + e for e in self.extensions]

    @property
    def effective_batch_size(self) -> int:
        """Sequences per optimizer step on one process."""
        return self.micro_batch_size * self.grad_accum_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Recipe":
        return load_recipe_dict({**self.to_dict(), **changes})


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Recipe)


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item_tp) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _check_types(recipe: Recipe) -> None:
    for key, tp in _field_types().items():
        value = getattr(recipe, key)
        if not _matches(value, tp):
            raise RecipeError(f"recipe key '{key}' must be {_describe(tp)}, got {value!r}")
        if tp is float and isinstance(value, int):
            setattr(recipe, key, float(value))


def load_recipe_dict(values: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build a Recipe from a mapping; unknown keys are errors that name the key and the nearest field."""
    if not isinstance(values, dict):
        raise RecipeError(f"{source} must be a mapping of key: value, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(Recipe)}
    for key in values:
        if key not in known:
            import difflib

            near = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f"; known keys: {', '.join(sorted(known))}"
            raise RecipeError(f"{source}: unknown recipe key '{key}'{hint}")
    return Recipe(**values)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` command-line override; the value is read as YAML (``8``, ``true``, ``[q_proj]``)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not of the form key=value (e.g. lora_r=8)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    # YAML 1.1 reads 1e-4 as a string (it wants 1.0e-4); users type 1e-4.
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)
    return key, value


def shipped_recipes_dir() -> Path:
    """The recipes that ship with qtrain: ``qtrain/recipes`` in an installed wheel, ``recipes/`` in a checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "recipes"
    return installed if installed.is_dir() else here.parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(shipped_recipes_dir().glob("*.yaml"))}


def resolve_recipe_path(ref: str | Path) -> Path:
    """A recipe file path, or the name of a shipped recipe (``cpu-lora`` or ``cpu-lora.yaml``)."""
    path = Path(ref)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if str(ref) in (name, name + ".yaml") and name in shipped:
        return shipped[name]
    raise RecipeError(f"recipe {str(ref)!r} does not exist as a file and is not a shipped recipe; shipped: "
                      f"{', '.join(shipped) or 'none found'} (qtrain recipes lists them)")


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML (a path or a shipped recipe's name; or the defaults) and apply ``key=value`` overrides."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = resolve_recipe_path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {exc}") from None
        values = loaded or {}
        source = str(path)
        if isinstance(values, dict):
            values.setdefault("name", path.stem)
    for text in overrides:
        key, value = parse_override(text)
        values = {**values, key: value} if isinstance(values, dict) else values
    return load_recipe_dict(values, source=source)


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe as YAML (atomically)."""
    from qtrain.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))

