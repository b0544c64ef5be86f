"""Tokenize documents, apply fill-in-the-middle, and pack into fixed-length sequences.

Packing concatenates documents separated by EOS and cuts the stream into ``seq_len`` pieces: no
padding, so every token the model sees is a real one (as in GPT-2/Codex pre-training and HF's
``run_clm``; attention crosses document boundaries, which the EOS marks). Alpaca records are packed the
same way, but their prompt tokens carry label -100, so the loss is computed on responses only.

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

from qtrain.data.corpus import DataError, Document, content_bucket

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<fim_prefix>", "<fim_middle>", "<fim_suffix>"
FIM_TOKENS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)
IGNORE = -100


def ensure_fim_tokens(tokenizer) -> list[int]:
    """Add the FIM sentinel tokens if the tokenizer lacks them; returns the ids of tokens it added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in FIM_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_additional_special_tokens=False)
    return [tokenizer.convert_tokens_to_ids(t) for t in missing]


def fim_split(text: str, rng: random.Random) -> tuple[str, str, str]:
    """Split at two uniformly random character positions (the FIM paper's character-level split)."""
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    return text[:a], text[a:b], text[b:]


@dataclass
class Example:
    ids: np.ndarray  # int32: compact (a Python list of ints costs ~36 bytes per token)
    labels: np.ndarray


def tokenize_documents(docs: list[Document], tokenizer, *, fim_rate: float = 0.0, fim_mode: str = "mixed",
                       seed: int = 0) -> list[Example]:
    """Token ids and labels per document, EOS appended; FIM applied at ``fim_rate``; Alpaca prompts masked.

    Documents are tokenized in batches and turned into int32 arrays at once, so the transient memory of
    Python int lists stays bounded by one batch.
    """
    out: list[Example] = []
    for start in range(0, len(docs), 256):
        out += _tokenize_batch(docs[start:start + 256], tokenizer, fim_rate=fim_rate, fim_mode=fim_mode, seed=seed)
    return out


def _tokenize_batch(docs: list[Document], tokenizer, *, fim_rate: float, fim_mode: str, seed: int) -> list[Example]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, which packing needs to separate documents; "
                        "set tokenizer.eos_token in the model directory")
    fim_ids = [tokenizer.convert_tokens_to_ids(t) for t in FIM_TOKENS] if fim_rate > 0 else None
    # Collect every piece of text first and tokenize in one batched call (fast tokenizers parallelise it).
    pieces: list[str] = []
    plans: list[tuple] = []
    for d in docs:
        if d.response is not None:
            plans.append(("alpaca", len(pieces)))
            pieces += [d.text, d.response]
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
    for kind, i in plans:
        if kind == "plain":
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
