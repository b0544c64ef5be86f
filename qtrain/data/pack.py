"""Tokenize documents, apply fill-in-the-middle, and pack into fixed-length sequences.

Packing concatenates documents separated by EOS and cuts the stream into ``seq_len`` pieces: no
padding, so every token the model sees is a real one (as in GPT-2/Codex pre-training and HF's
``run_clm``; attention crosses document boundaries, which the EOS marks). Alpaca records are packed the
same way, but their prompt tokens carry label -100, so the loss is computed on responses only.

Instruction records (chat ``messages``, ``prompt``/``completion``, and Alpaca) are rendered with the tokenizer's
chat template when it has one, so a model is trained on exactly the text ``qtrain eval`` and ``qtrain serve``
prompt it with; the loss is on the assistant turns only (each turn's text and its end-of-turn marker).
Transformers' ``return_assistant_tokens_mask`` needs ``{% generation %}`` markers that most templates (SmolLM2's
among them) lack, so the turns are found by rendering the conversation prefix by prefix, and each piece is
tokenized on its own, as the prompt is at inference.

FIM (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle"; Code Llama
sec. 2.3): with probability ``fim_rate`` a document is split at two uniformly random character
positions into prefix/middle/suffix and reordered as PSM ``<PRE> prefix <SUF> suffix <MID> middle`` or
SPM ``<PRE> <SUF> suffix <MID> prefix middle``. The default tokenizer has no FIM tokens; we add
StarCoder's names (``<fim_prefix>``, ``<fim_middle>``, ``<fim_suffix>``) as special tokens and resize
the embeddings (new rows initialised to the mean of the old ones by transformers); with LoRA the new rows
are trained through peft's ``trainable_token_indices``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from qtrain.data.corpus import DataError, Document, content_bucket, render_alpaca

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<fim_prefix>", "<fim_middle>", "<fim_suffix>"
FIM_TOKENS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)
IGNORE = -100


def ensure_fim_tokens(tokenizer) -> list[int]:
    """Add the FIM sentinel tokens if the tokenizer lacks them; returns the ids of tokens it added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in FIM_TOKENS if t not in vocab]
    if missing:
        try:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_additional_special_tokens=False)
        except TypeError:  # transformers 5 calls the list extra_special_tokens
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return [tokenizer.convert_tokens_to_ids(t) for t in missing]


def fim_split(text: str, rng: random.Random) -> tuple[str, str, str]:
    """Split at two uniformly random character positions (the FIM paper's character-level split)."""
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    return text[:a], text[a:b], text[b:]


@dataclass
class Example:
    ids: np.ndarray  # int32: compact (a Python list of ints costs ~36 bytes per token)
    labels: np.ndarray


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The conversation rendered by the tokenizer's chat template, cut into (text, is_assistant_turn) pieces."""
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(msgs, tokenize=False,  # noqa: E731
                                                                  add_generation_prompt=gen)
    full = render(messages)
    pieces, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = render(messages[:i], True), render(messages[:i + 1])
        if not (end.startswith(start) and full.startswith(end) and len(start) >= pos):
            raise DataError("this tokenizer's chat template does not render a conversation prefix by prefix, so the "
                            "assistant turns cannot be found; set instruction_template=alpaca")
        pieces += [(full[pos:len(start)], False), (full[len(start):len(end)], True)]
        pos = len(end)
    if pos < len(full):
        pieces.append((full[pos:], False))
    return [(t, a) for t, a in pieces if t]


def _as_alpaca(doc: Document) -> tuple[str, str]:
    """A chat record without a chat template: one user turn (after an optional system turn) and one answer."""
    roles = [m["role"] for m in doc.messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise DataError(f"{doc.source}: a conversation with turns {roles} needs a tokenizer with a chat template; "
                        "this one has none (single-turn records are rendered in the Alpaca form)")
    user, answer = doc.messages[-2]["content"], doc.messages[-1]["content"]
    return render_alpaca(user, None), answer


def tokenize_documents(docs: list[Document], tokenizer, *, fim_rate: float = 0.0, fim_mode: str = "mixed",
                       seed: int = 0, chat: bool = False) -> list[Example]:
    """Token ids and labels per document, EOS appended; FIM applied at ``fim_rate``; instruction prompts masked.

    ``chat``: render instruction records with the tokenizer's chat template (else the Alpaca template).
    Documents are tokenized in batches and turned into int32 arrays at once, so the transient memory of
    Python int lists stays bounded by one batch.
    """
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DataError("instruction_template=chat, but the tokenizer has no chat template; use "
                        "instruction_template=alpaca or a model with a chat template")
    out: list[Example] = []
    for start in range(0, len(docs), 256):
        out += _tokenize_batch(docs[start:start + 256], tokenizer, fim_rate=fim_rate, fim_mode=fim_mode, seed=seed,
                               chat=chat)
    return out


def _tokenize_batch(docs: list[Document], tokenizer, *, fim_rate: float, fim_mode: str, seed: int,
                    chat: bool) -> list[Example]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, which packing needs to separate documents; "
                        "set tokenizer.eos_token in the model directory")
    fim_ids = [tokenizer.convert_tokens_to_ids(t) for t in FIM_TOKENS] if fim_rate > 0 else None
    # Collect every piece of text first and tokenize in one batched call (fast tokenizers parallelise it).
    pieces: list[str] = []
    plans: list[tuple] = []
    for d in docs:
        if d.messages is not None and chat:
            segments = chat_segments(tokenizer, d.messages)
            plans.append(("chat", len(pieces), [a for _, a in segments]))
            pieces += [t for t, _ in segments]
            continue
        if d.is_instruction:
            plans.append(("alpaca", len(pieces)))
            pieces += [d.text, d.response] if d.response is not None else list(_as_alpaca(d))
            continue
        rng = random.Random(f"{seed}:{content_bucket(d.text)}")
        if fim_ids and rng.random() < fim_rate:
            mode = fim_mode if fim_mode != "mixed" else ("spm" if rng.random() < 0.5 else "psm")
            plans.append((mode, len(pieces)))
            pieces += list(fim_split(d.text, rng))
        else:
            plans.append(("plain", len(pieces)))
            pieces.append(d.text)
    enc = tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    out = []
    arr = lambda x: np.asarray(x, dtype=np.int32)  # noqa: E731
    for kind, i, *rest in plans:
        if kind == "chat":
            # the template's end-of-turn marker ends the record (it is SmolLM2's EOS); no EOS is appended
            ids, labels = [], []
            for piece, trained in zip(enc[i:i + len(rest[0])], rest[0]):
                ids += piece
                labels += piece if trained else [IGNORE] * len(piece)
            out.append(Example(arr(ids), arr(labels)))
        elif kind == "plain":
            ids = arr(enc[i] + [eos])
            out.append(Example(ids, ids))
        elif kind == "alpaca":
            prompt, response = enc[i], enc[i + 1] + [eos]
            out.append(Example(arr(prompt + response), arr([IGNORE] * len(prompt) + response)))
        else:
            pre, mid, suf = enc[i], enc[i + 1], enc[i + 2]
            p_id, m_id, s_id = fim_ids
            if kind == "psm":
                ids = [p_id] + pre + [s_id] + suf + [m_id] + mid + [eos]
            else:  # spm, the variant of the FIM paper's appendix D / Code Llama
                ids = [p_id, s_id] + suf + [m_id] + pre + mid + [eos]
            out.append(Example(arr(ids), arr(ids)))
    return out


def pack(examples: list[Example], seq_len: int, allow_short: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Concatenate and cut into ``[N, seq_len]`` input ids and labels; returns (ids, labels, tokens_dropped).

    The tail that does not fill a whole sequence is dropped (and counted). With ``allow_short`` a stream
    shorter than ``seq_len`` becomes one shorter sequence instead of nothing (used for tiny validation sets).
    """
    if not examples:
        return torch.empty(0, seq_len, dtype=torch.long), torch.empty(0, seq_len, dtype=torch.long), 0
    ids = np.concatenate([e.ids for e in examples])
    labels = np.concatenate([e.labels for e in examples])
    n = len(ids) // seq_len
    if n == 0:
        if allow_short and len(ids) >= 2:
            return torch.from_numpy(ids[None].astype(np.int64)), torch.from_numpy(labels[None].astype(np.int64)), 0
        return torch.empty(0, seq_len, dtype=torch.long), torch.empty(0, seq_len, dtype=torch.long), len(ids)
    cut = n * seq_len
    as_long = lambda a: torch.from_numpy(a[:cut].astype(np.int64)).view(n, seq_len)  # noqa: E731
    return as_long(ids), as_long(labels), len(ids) - cut
