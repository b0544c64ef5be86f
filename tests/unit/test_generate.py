"""Continuous batching (qtrain/generate.py) against transformers' generate, one prompt at a time.

The tiny model runs in float64 so that a different batch shape cannot flip an argmax through rounding: what is
checked is the bookkeeping (left padding, positions, joining and cutting the cache), which must be exact.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtrain.generate import ContinuousBatcher, Request, generate_many, stop_reason, supports_continuous_batching

PROMPTS = ["def add(a, b):\n", "import os\n\n\nclass Path:\n    def __init__(self, root):\n        self.root = root\n",
           "x = 1", "for i in range(10):\n    print(i)\n# and then", "def f", "return None\n\n\ndef parse(text):\n",
           "while True:\n    break\n"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float64).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def reference(model, tok, prompt, n, eos):
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new[:new.index(eos)] if eos in new else new


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_greedy_equals_generate_one_prompt_at_a_time(tiny, batch_size):
    model, tok = tiny
    # an EOS the random model actually emits now and then, so rows end at different steps
    eos = tok.convert_tokens_to_ids("\u010a")  # byte-level BPE's "\n"
    expected = [reference(model, tok, p, 20, eos) for p in PROMPTS]
    assert len({len(e) for e in expected}) > 1, "the rows should end at different steps"
    ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    batcher = ContinuousBatcher(model, tok, batch_size=batch_size, max_new_tokens=20, eos_ids={eos})
    done = batcher.run([Request(i, x) for i, x in enumerate(ids)])
    assert [f.index for f in done] == list(range(len(PROMPTS)))
    for f, e in zip(done, expected):
        assert f.text == tok.decode(e, skip_special_tokens=True)
        assert f.tokens == len(e) and f.reason == ("length" if len(e) == 20 else "eos")


def test_sampling_does_not_depend_on_the_batch(tiny):
    model, tok = tiny
    a, _ = generate_many(model, tok, PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.9, batch_size=2, seed=5)
    b, _ = generate_many(model, tok, PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.9, batch_size=7, seed=5)
    c, _ = generate_many(model, tok, PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.9, batch_size=7, seed=6)
    assert [f.text for f in a] == [f.text for f in b]
    assert [f.text for f in a] != [f.text for f in c]


def test_stop_strings_and_closed_fence_end_a_row():
    assert stop_reason("x\ndefault", ["\ndef "], False) is None
    assert stop_reason("x\ndef g(", ["\ndef "], False) == "stop"
    assert stop_reason("Here:\n```python\nx = 1\n", [], True) is None
    assert stop_reason("Here:\n```python\nx = 1\n```", [], True) == "stop"


def test_stats_and_stops_through_generate_many(tiny):
    model, tok = tiny
    out, stats = generate_many(model, tok, PROMPTS, max_new_tokens=30, stops=["e"], batch_size=4)
    for f in out:
        assert f.reason in ("stop", "eos", "length")
        if f.reason == "stop":
            assert "e" in f.text
    assert stats["generation_tokens"] == sum(f.tokens for f in out) and stats["engine"] == "continuous"
    assert stats["forward_tokens"] >= stats["generation_tokens"]
    with pytest.raises(ValueError, match="empty"):
        generate_many(model, tok, [""], max_new_tokens=2)


def test_which_models_take_continuous_batching(tiny):
    model, _ = tiny
    assert supports_continuous_batching(model)
    assert not supports_continuous_batching(object())
    model.config.sliding_window = 4096
    try:
        assert not supports_continuous_batching(model)
    finally:
        model.config.sliding_window = None


def test_nucleus_keeps_the_smallest_prefix_that_reaches_top_p():
    from qtrain.generate import _pick

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    seen = {_pick(logits, 1.0, 0.75, g) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.75 <= 0.8
    assert {_pick(logits, 1.0, 0.5, g) for _ in range(50)} == {0}
    assert {_pick(logits, 1.0, 1.0, g) for _ in range(600)} == {0, 1, 2, 3}
    assert _pick(logits, 0.0, 0.5, g) == 0
    big = torch.randn(50_000) * 0.01  # a flat distribution: the nucleus needs most of the vocabulary
    assert 0 <= _pick(big, 1.0, 0.99, g) < 50_000


def test_gqa_attention_gives_the_same_logits_without_copying_heads(tiny):
    """The tiny model has 4 query heads over 2 key/value heads; with a left-padded batch (a mask, as in decoding)
    SDPA's own grouping must give exactly what transformers' repeat_kv path gives, and the setting is restored."""
    from qtrain.generate import GQA_ATTENTION, gqa_attention

    model, tok = tiny
    assert model.config._attn_implementation == "sdpa"
    batch = tok(PROMPTS[:3], return_tensors="pt", padding=True, add_special_tokens=False)
    assert not batch.attention_mask.all(), "the batch should carry padding, so a mask is passed"
    with torch.no_grad():
        expected = model(**batch).logits
        with gqa_attention(model):
            assert model.config._attn_implementation == GQA_ATTENTION
            got = model(**batch).logits
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(got, expected)


def test_gqa_attention_leaves_other_attention_alone(tiny_model_dir):
    from qtrain.generate import gqa_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    with gqa_attention(model):
        assert model.config._attn_implementation == "eager"
