"""Shared fixtures: a tiny random-init Llama with a tiny BPE tokenizer, and a small corpus of real code.

Nothing here downloads anything: the tokenizer is trained in milliseconds on the corpus itself.

Layout: tests/unit/ runs on tiny random-init models and synthetic inputs; tests/integration/ runs the real default
model (marked ``integration`` here, by folder). The default run takes both; ``-m "not integration"`` the unit ones.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def small_stdlib_files(n: int = 24, lo: int = 2000, hi: int = 6000) -> list[Path]:
    """``n`` real, small Python files from the running interpreter's standard library (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if lo <= p.stat().st_size <= hi)
    return files[:n]


@pytest.fixture(scope="session")
def code_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("code")
    for p in small_stdlib_files():
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, code_dir) -> Path:
    """A 2-layer Llama (hidden 32) with a 512-token byte-level BPE tokenizer, saved as a HF model directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.read_text() for p in sorted(code_dir.iterdir())], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(d)
    fast.save_pretrained(d)
    return d


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama with a ChatML chat template (the shape of SmolLM2-Instruct's), as an instruct model."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-chat")
    for p in tiny_model_dir.iterdir():
        shutil.copy(p, d / p.name)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = CHATML
    tok.save_pretrained(d)
    return d
