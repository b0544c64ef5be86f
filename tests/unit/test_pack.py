import random

import pytest
from transformers import AutoTokenizer

from qtrain.data.corpus import Document, render_alpaca
from qtrain.data.pack import FIM_TOKENS, IGNORE, ensure_fim_tokens, fim_split, pack, tokenize_documents


@pytest.fixture()
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_packing_separates_documents_by_eos_and_wastes_nothing(tok):
    docs = [Document("def a():\n    return 1\n", "a"), Document("import os\nprint(os.sep)\n", "b")]
    ex = tokenize_documents(docs, tok)
    assert all(e.ids[-1] == tok.eos_token_id for e in ex)
    stream = ex[0].ids.tolist() + ex[1].ids.tolist()
    ids, labels, dropped = pack(ex, 8)
    assert ids.shape == (len(stream) // 8, 8)
    assert ids.flatten().tolist() == stream[: ids.numel()]
    assert dropped == len(stream) - ids.numel()
    assert (labels == ids).all()


def test_short_stream_allowed_only_for_validation(tok):
    ex = tokenize_documents([Document("x = 1\n", "a")], tok)
    assert pack(ex, 512)[0].shape[0] == 0
    ids, _, _ = pack(ex, 512, allow_short=True)
    assert ids.shape == (1, len(ex[0].ids))


def test_alpaca_loss_only_on_the_response(tok):
    prompt = render_alpaca("Add two numbers.", "")
    ex = tokenize_documents([Document(prompt, "r", "def add(a, b):\n    return a + b\n")], tok)[0]
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    assert ex.labels[:n_prompt].tolist() == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:].tolist() == ex.ids[n_prompt:].tolist()
    assert tok.decode(ex.ids[n_prompt:-1].tolist()) == "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_fim_formats(tok, mode):
    added = ensure_fim_tokens(tok)
    assert len(added) == 3 and ensure_fim_tokens(tok) == []
    text = "def area(r):\n    return 3.14159 * r * r\n" * 4
    ex = tokenize_documents([Document(text, "a")], tok, fim_rate=1.0, fim_mode=mode, seed=3)[0]
    ex.ids = ex.ids.tolist()
    pre_id, mid_id, suf_id = (tok.convert_tokens_to_ids(t) for t in FIM_TOKENS)
    assert ex.ids[0] == pre_id and ex.ids[-1] == tok.eos_token_id
    if mode == "spm":
        assert ex.ids[1] == suf_id
    else:
        assert ex.ids.index(suf_id) < ex.ids.index(mid_id)
    # the three pieces are the same characters, reordered
    prefix, middle, suffix = fim_split(text, random.Random(0))
    assert prefix + middle + suffix == text
    decoded = tok.decode([i for i in ex.ids if i not in (pre_id, mid_id, suf_id, tok.eos_token_id)])
    assert sorted(decoded) == sorted(text)


def test_fim_rate_zero_leaves_text_alone_and_is_deterministic(tok):
    ensure_fim_tokens(tok)
    docs = [Document(f"value_{i} = {i} * 2\n" * 5, str(i)) for i in range(40)]
    a = tokenize_documents(docs, tok, fim_rate=0.5, seed=1)
    b = tokenize_documents(docs, tok, fim_rate=0.5, seed=1)
    assert [e.ids.tolist() for e in a] == [e.ids.tolist() for e in b]
    n_fim = sum(e.ids[0] == tok.convert_tokens_to_ids(FIM_TOKENS[0]) for e in a)
    assert 8 <= n_fim <= 32
    plain = tokenize_documents(docs, tok, fim_rate=0.0)
    assert all(FIM_TOKENS[0] not in tok.decode(e.ids.tolist()) for e in plain)
