"""Continuous batching for evaluation and data generation: many prompts, one model, every row stopped on its own.

Why not ``model.generate`` on fixed batches: a batch runs until its longest answer ends, so a batch of 16 where one
answer rambles to ``max_new_tokens`` spends 15/16 of its compute on rows that have already finished. Measured on
the default model (HumanEval, chat prompts, batch 16): 28 useful tokens/s against about 150 tokens/s the same batch
decodes when every row is live. Here a finished row leaves the batch at once and the next waiting prompt takes its
place, so the batch stays full until the queue is empty.

How the rows share one KV cache: every row is left-padded to the cache's length (masked, positions counted from
its first real token, as transformers' ``generate`` does for left padding); a new prompt is prefilled on its own
and its keys/values are padded on the left and appended to the batch; columns that no live row uses any more are
cut off the left after every step, so the cache stays as long as the oldest live row, not the whole run.

What it costs: CPU fp32 matmul kernels are not batch-invariant (the same row computed at batch 16 and batch 3 can
differ in the last bit), so a greedy answer can differ from the one ``generate`` gives at a fixed batch when two
logits are within rounding of each other. ``benchmarks/selftrain.py`` counts how often that happens on HumanEval.

Grouped-query attention: transformers' SDPA path copies every key/value head ``heads / kv_heads`` times
(``repeat_kv``) whenever an attention mask is passed on a CPU, and batched decoding always passes one. Profiled on
the default model at batch 16 that copy was 39% of a decoding step. While the batcher runs, the model's attention is
SDPA with ``enable_gqa=True`` instead (``gqa_attention``), which gives bit-identical outputs on the same inputs.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

GQA_ATTENTION = "qtrain_sdpa_gqa"


def _sdpa_gqa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers' ``sdpa_attention_forward`` without the ``repeat_kv`` copy: torch's SDPA groups the query
    heads over the shared key/value heads itself (``enable_gqa``, torch >= 2.5)."""
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def gqa_attention(model):
    """Within the block, a model on transformers' SDPA attention whose key/value heads are fewer than its query
    heads runs ``_sdpa_gqa_forward``; any other model is left as it is. The model's setting is restored after."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "_attn_implementation", None) != "sdpa" or not heads or kv_heads >= heads:
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_ATTENTION, _sdpa_gqa_forward)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    config._attn_implementation = GQA_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


@dataclass
class Request:
    """One prompt to continue; ``index`` is its position in the caller's list."""
    index: int
    prompt_ids: list[int]
    generator: torch.Generator | None = None


@dataclass
class Finished:
    index: int
    text: str
    tokens: int  # new tokens, without the EOS that ended the answer
    reason: str  # "eos" | "stop" | "length"


@dataclass
class _Row:
    req: Request
    new_ids: list[int] = field(default_factory=list)
    real_len: int = 0  # prompt + generated tokens (the row's next position id)


def stop_reason(text: str, stops: list[str], closed_fence: bool) -> str | None:
    """'stop' when ``text`` holds a stop string, or (chat answers) its first fenced code block is closed."""
    if closed_fence and text.count("```") >= 2:
        return "stop"
    if any(s and s in text for s in stops):
        return "stop"
    return None


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0 (argmax of fp32 logits, as ``generate``); otherwise temperature + nucleus sampling.

    The nucleus is found with ``topk`` on a growing k, not a sort of the whole vocabulary: sorting 49,152
    probabilities per row per step took ~100 ms here, longer than the forward pass of the whole batch.
    """
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    k = 64
    while True:
        top, index = torch.topk(probs, min(k, probs.numel()))
        mass = torch.cumsum(top, 0)
        if mass[-1] >= top_p or k >= probs.numel():
            break
        k *= 8
    n = int(torch.searchsorted(mass, torch.tensor([top_p], dtype=mass.dtype))) + 1  # smallest prefix reaching top_p
    top, index = top[:n], index[:n]
    return int(index[torch.multinomial(top / top.sum(), 1, generator=generator)])


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pad a [batch, heads, seq, dim] key/value tensor with ``n`` zero positions on the left."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


def _growing_layer(keys: torch.Tensor, values: torch.Tensor, spare: int):
    """A DynamicLayer holding ``keys``/``values`` in a buffer with ``spare`` free positions at the end.

    Why: DynamicLayer appends a token with ``torch.cat``, copying the whole cache every step; at 16 rows x 1,000
    positions that is 0.7 GB per step for the default model, more time than the matmuls. Here a step writes one
    position in place; the buffer is copied only when it is full (doubling) or the batch changes.
    """
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def fill(self, k: torch.Tensor, v: torch.Tensor, room: int) -> None:
            b, h, n, d = k.shape
            self._k, self._v = k.new_empty(b, h, n + room, d), v.new_empty(b, h, n + room, d)
            self._k[:, :, :n], self._v[:, :, :n] = k, v
            self._n = n
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]
            self.dtype, self.device, self.is_initialized = k.dtype, k.device, True

        def update(self, key_states, value_states, *args, **kwargs):  # 4.57 passes cache_kwargs, 5.x **kwargs
            n = key_states.shape[-2]
            if self._n + n > self._k.shape[2]:
                self.fill(self.keys, self.values, max(64, self._n))
            self._k[:, :, self._n:self._n + n] = key_states
            self._v[:, :, self._n:self._n + n] = value_states
            self._n += n
            self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]
            return self.keys, self.values

    layer = GrowingLayer()
    layer.fill(keys, values, spare)
    return layer


class ContinuousBatcher:
    """Decode many prompts with one model: greedy or sampled, EOS / stop strings / closed fence per row.

    ``model`` is a transformers causal LM whose forward takes ``past_key_values`` as a ``DynamicCache``
    (every decoder in transformers that uses full attention does).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_new_tokens: int = 384,
                 temperature: float = 0.0, top_p: float = 1.0, stops: list[str] | None = None,
                 closed_fence: bool = False, eos_ids: set[int] | None = None):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be positive")
        self.model, self.tok = model, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.stops, self.closed_fence = list(stops or []), closed_fence
        eos = eos_ids if eos_ids is not None else {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.eos_ids = {e for e in eos if e is not None}
        self.device = next(model.parameters()).device
        self.forward_tokens = 0  # every token position the model computed, padding included (for utilisation)

    # -------------------------------------------------------------------------------------------- the cache

    def _prefill(self, req: Request):
        """The prompt alone through the model: (its DynamicCache, last-position logits)."""
        from transformers import DynamicCache

        ids = torch.tensor([req.prompt_ids], device=self.device)
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        self.forward_tokens += ids.shape[1]
        return out.past_key_values, out.logits[0, -1].float()

    def _rebuild(self, cache, mask: torch.Tensor | None, keep: list[int], joins: list[tuple]) -> tuple:
        """The batch cache after finished rows leave (``keep``: the rows that stay) and prefilled prompts join
        (``joins``: (their cache, prompt length)): one copy per change of the batch, every row left-padded to a
        common length, and the left columns no remaining row attends to cut off."""
        keys: list[list[torch.Tensor]] = []
        values: list[list[torch.Tensor]] = []
        masks: list[torch.Tensor] = []
        if cache is not None and keep:
            index = torch.tensor(keep, device=mask.device)
            kept = mask.index_select(0, index)
            first = int(kept.any(0).int().argmax())
            masks.append(kept[:, first:])
            for layer in cache.layers:
                keys.append([layer.keys.index_select(0, index)[:, :, first:]])
                values.append([layer.values.index_select(0, index)[:, :, first:]])
        for new_cache, n in joins:
            masks.append(torch.ones(1, n, dtype=torch.long, device=self.device))
            for i, layer in enumerate(new_cache.layers):
                if len(keys) <= i:
                    keys.append([])
                    values.append([])
                keys[i].append(layer.keys)
                values[i].append(layer.values)
        if not masks:
            return None, None
        length = max(m.shape[1] for m in masks)
        mask = torch.cat([torch.cat([m.new_zeros(m.shape[0], length - m.shape[1]), m], dim=1) for m in masks])
        cache = cache if cache is not None else joins[0][0]
        cache.layers = [_growing_layer(torch.cat([_left_pad(k, length - k.shape[2]) for k in ks]),
                                       torch.cat([_left_pad(v, length - v.shape[2]) for v in vs]), spare=64)
                        for ks, vs in zip(keys, values)]
        return cache, mask

    # -------------------------------------------------------------------------------------------- the loop

    def _finish(self, row: _Row, reason: str) -> Finished:
        ids = row.new_ids[:-1] if reason == "eos" else row.new_ids
        return Finished(row.req.index, self.tok.decode(ids, skip_special_tokens=True), len(ids), reason)

    def _advance(self, row: _Row, logits: torch.Tensor) -> str | None:
        """Pick the row's next token; returns why the row is done, or None."""
        token = _pick(logits, self.temperature, self.top_p, row.req.generator)
        row.new_ids.append(token)
        row.real_len += 1
        if token in self.eos_ids:
            return "eos"
        if self.stops or self.closed_fence:
            reason = stop_reason(self.tok.decode(row.new_ids, skip_special_tokens=True), self.stops,
                                 self.closed_fence)
            if reason:
                return reason
        return "length" if len(row.new_ids) >= self.max_new_tokens else None

    @torch.inference_mode()
    def run(self, requests: list[Request], on_finish: Callable[[Finished], None] | None = None) -> list[Finished]:
        """Decode every request; ``on_finish`` is called as each one ends (for progress bars)."""
        queue = list(reversed(requests))  # pop() takes them in the caller's order
        rows: list[_Row] = []
        keep: list[int] = []  # the rows still live after the last step
        cache, mask = None, None
        done: list[Finished] = []

        def finish(f: Finished):
            done.append(f)
            if on_finish:
                on_finish(f)

        while queue or rows:
            # fill free slots with prefilled prompts (a prompt can end at its first token), then rebuild once
            joins, joined = [], []
            while queue and len(keep) + len(joins) < self.batch_size:
                req = queue.pop()
                new_cache, logits = self._prefill(req)
                row = _Row(req, real_len=len(req.prompt_ids))
                reason = self._advance(row, logits)
                if reason:
                    finish(self._finish(row, reason))
                    continue
                joins.append((new_cache, len(req.prompt_ids)))
                joined.append(row)
            if joins or len(keep) < len(rows):
                cache, mask = self._rebuild(cache, mask, keep, joins)
                rows = [rows[i] for i in keep] + joined
                keep = list(range(len(rows)))
            if not rows:
                continue
            ids = torch.tensor([[r.new_ids[-1]] for r in rows], device=self.device)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = torch.tensor([[r.real_len - 1] for r in rows], device=self.device)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            self.forward_tokens += len(rows)
            logits = out.logits[:, -1].float()
            keep = []
            for i, row in enumerate(rows):
                reason = self._advance(row, logits[i])
                if reason:
                    finish(self._finish(row, reason))
                else:
                    keep.append(i)
        return sorted(done, key=lambda f: f.index)


def supports_continuous_batching(model) -> bool:
    """A PyTorch causal LM whose cache is a plain DynamicCache of full-attention layers (no sliding window, no
    recurrent state): the only kind whose cached keys can be padded, joined and cut as above."""
    if not isinstance(model, torch.nn.Module):
        return False
    config = getattr(model, "config", None)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return getattr(config, "model_type", "") not in {"mamba", "mamba2", "rwkv", "jamba", "falcon_mamba", "zamba"}


def generate_many(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, stops: list[str] | None = None, closed_fence: bool = False,
                  batch_size: int = 16, seed: int = 0,
                  on_finish: Callable[[Finished], None] | None = None) -> tuple[list[Finished], dict]:
    """Continue every prompt; returns (one Finished per prompt, in order; timing stats).

    Sampling draws from one generator per prompt, seeded by ``seed`` and the prompt's index, so a sample does
    not depend on which other prompts shared its batch.
    """
    requests = []
    for i, text in enumerate(prompts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenization")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i) if temperature > 0 else None
        requests.append(Request(i, ids, gen))
    batcher = ContinuousBatcher(model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, stops=stops, closed_fence=closed_fence)
    start = time.perf_counter()
    with gqa_attention(model):
        results = batcher.run(requests, on_finish)
    seconds = time.perf_counter() - start
    tokens = sum(f.tokens for f in results)
    return results, {"generation_tokens": tokens, "generation_seconds": round(seconds, 2),
                     "generation_tokens_per_second": round(tokens / max(seconds, 1e-9), 2),
                     "forward_tokens": batcher.forward_tokens, "batch_size": batch_size, "engine": "continuous"}
