"""Chat-format SFT data: records read, rendered with the chat template, loss on the assistant turns only."""

import json

import pytest
from transformers import AutoTokenizer

from qtrain.data.corpus import CorpusReport, DataError, Document, chat_messages, load_corpus, read_jsonl, \
    render_alpaca
from qtrain.data.pack import IGNORE, chat_segments, tokenize_documents
from qtrain.recipe import load_recipe
from qtrain.train import fit

ANSWER = "```python\ndef add(a, b):\n    return a + b\n```"
TINY = ["seq_len=64", "micro_batch_size=2", "grad_accum_steps=1", "val_max_sequences=2", "warmup_steps=1",
        "lora_r=4", "lora_alpha=8", "save_every=0", "log_every=1"]


@pytest.fixture()
def chat_tok(chat_model_dir):
    return AutoTokenizer.from_pretrained(chat_model_dir)


def trained_text(tok, ex) -> str:
    return tok.decode([i for i, l in zip(ex.ids.tolist(), ex.labels.tolist()) if l != IGNORE])


def test_records_in_every_chat_shape_and_their_errors():
    msgs = [{"role": "user", "content": "Add."}, {"role": "assistant", "content": ANSWER}]
    assert chat_messages({"messages": msgs}) == msgs
    assert chat_messages({"prompt": "Add.", "completion": ANSWER}) == msgs
    assert chat_messages({"prompt": msgs[:1], "completion": msgs[1:]}) == msgs
    for bad, message in [({"messages": []}, "non-empty"), ({"messages": [{"role": "bot", "content": "x"}]}, "role"),
                         ({"messages": msgs[:1]}, "no assistant"), ({"messages": msgs[::-1]}, "starts with"),
                         ({"prompt": 3, "completion": "x"}, "string or a list")]:
        with pytest.raises(ValueError, match=message):
            chat_messages(bad)


def test_chat_jsonl_is_read_and_a_bad_line_names_its_number(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "Add two numbers.", "completion": ANSWER}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: the conversation has no assistant message"):
        read_jsonl(f, "auto", CorpusReport("x", "auto"), skip_bad_lines=False)
    docs, fmt = read_jsonl(f, "auto", CorpusReport("x", "auto"), skip_bad_lines=True)
    assert fmt == "chat" and len(docs) == 1 and docs[0].messages[1]["content"] == ANSWER


def test_exact_mask_on_a_two_turn_conversation(chat_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add."},
            {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "Now subtract."},
            {"role": "assistant", "content": "```python\ndef sub(a, b):\n    return a - b\n```"}]
    ex = tokenize_documents([Document("", "r", messages=msgs)], chat_tok, chat=True)[0]
    full = chat_tok.apply_chat_template(msgs, tokenize=False)
    assert chat_tok.decode(ex.ids.tolist()) == full  # the whole conversation, nothing appended
    pieces = chat_segments(chat_tok, msgs)
    assert [t for t, a in pieces if a] == [ANSWER + "<|im_end|>\n", msgs[4]["content"] + "<|im_end|>\n"]
    expected = []
    for text, trained in pieces:
        ids = chat_tok(text, add_special_tokens=False).input_ids
        expected += ids if trained else [IGNORE] * len(ids)
    assert ex.labels.tolist() == expected
    # the prompt is tokenized exactly as qtrain eval tokenizes it
    prompt = chat_tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    n = len(chat_tok(prompt, add_special_tokens=False).input_ids)
    assert ex.ids[:n].tolist() == chat_tok(prompt, add_special_tokens=False).input_ids
    assert ex.labels[:n].tolist() == [IGNORE] * n and ex.labels[n] != IGNORE


def test_alpaca_records_use_the_chat_template_where_there_is_one(chat_tok, tiny_model_dir):
    doc = Document(render_alpaca("Add two numbers.", ""), "r", "def add(a, b):\n    return a + b\n",
                   [{"role": "user", "content": "Add two numbers."},
                    {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"}])
    chat = tokenize_documents([doc], chat_tok, chat=True)[0]
    assert trained_text(chat_tok, chat) == "def add(a, b):\n    return a + b\n<|im_end|>\n"
    assert "<|im_start|>user\nAdd two numbers.<|im_end|>" in chat_tok.decode(chat.ids.tolist())
    plain_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    alpaca = tokenize_documents([doc], plain_tok)[0]
    assert "### Response:" in plain_tok.decode(alpaca.ids.tolist())
    with pytest.raises(DataError, match="no chat template"):
        tokenize_documents([doc], plain_tok, chat=True)
    # a single-turn chat record without a template falls back to the Alpaca form; a multi-turn one cannot
    single = Document("", "r", messages=doc.messages)
    assert plain_tok.decode(tokenize_documents([single], plain_tok)[0].ids.tolist()).startswith("Below is")
    multi = Document("", "r", messages=doc.messages * 2)
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        tokenize_documents([multi], plain_tok)


def test_instruction_records_keep_long_prose_lines(tmp_path):
    long_line = "Write a function that " + "does one more thing and " * 20 + "returns it."
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{long_line} ({i})", "completion": f"```python\nx = {i}\n```"}) + "\n"
                         for i in range(20)))
    train, val, report = load_corpus(str(f), near_dup_threshold=1.0)
    assert report.format == "chat" and len(train) + len(val) == 20 and not report.dropped


def test_fit_on_chat_data_trains_on_answers_only(tmp_path, chat_model_dir):
    data = tmp_path / "chat.jsonl"
    recs = [{"messages": [{"role": "user", "content": f"Write a function that returns {i} times its argument."},
                          {"role": "assistant", "content": f"```python\ndef times_{i}(x):\n    return {i} * x\n```"}]}
            for i in range(60)]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = fit(load_recipe(None, TINY + ["max_steps=2", "near_dup_threshold=1.0"]), model=str(chat_model_dir),
                  data=str(data), output=tmp_path / "run")
    assert summary["data"]["format"] == "chat" and summary["data"]["instruction_template"] == "chat"
    assert summary["val_loss_after"] < summary["val_loss_before"] + 1.0
