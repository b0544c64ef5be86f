"""Run a qtrain ONNX export from Python: ``OnnxForCausalLM``, a transformers-compatible causal LM over an
onnxruntime session.

    from qtrain.export.runtime import OnnxForCausalLM
    model = OnnxForCausalLM.from_pretrained("runs/my-run/onnx/int8")
    out = model.generate(**tokenizer("def f(x):", return_tensors="pt"), max_new_tokens=32)

It is a ``PreTrainedModel`` with ``GenerationMixin``, so transformers' ``generate`` (greedy, sampling, stop
strings, streamers, left-padded batches) drives it, and ``model(input_ids=..., attention_mask=...).logits`` works
as for a PyTorch model. For one prompt at a time, :class:`OnnxDecoder` (also importable from here) is the faster loop: it feeds
the session's ``present.*`` outputs back unchanged, where ``generate`` goes through a torch cache each step.

Why not optimum-onnx's ``ORTModelForCausalLM``: optimum-onnx requires ``transformers<4.58``, which would hold
the whole package on the 4.x line. The export keeps optimum's input and output names, so where optimum-onnx is
installed (transformers 4.x) ``ORTModelForCausalLM.from_pretrained(dir)`` loads the same directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from qtrain.export.decoder import (  # noqa: F401 - OnnxDecoder re-exported
    NotAnExportError,
    OnnxDecoder,
    onnx_file,
    session_options,
)

# transformers 5.2x renamed the cache argument and output field from ``past_key_values`` to ``cache``
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class OnnxForCausalLM(PreTrainedModel, GenerationMixin):
    """A decoder exported with its KV cache (inputs ``input_ids``, ``attention_mask``, optionally ``position_ids``,
    ``past_key_values.{i}.key|value``; outputs ``logits``, ``present.{i}.key|value``), as a transformers model."""

    main_input_name = "input_ids"
    base_model_prefix = "onnx"
    _supports_cache_class = True
    _is_stateful = False

    def __init__(self, config, session, directory: Path | None = None):
        super().__init__(config)
        self.session = session
        self.directory = directory
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.past_names = [n for n in self.input_names if n.startswith("past_key_values.")]
        if "logits" not in self.output_names or not self.past_names or len(self.past_names) % 2:
            raise NotAnExportError(f"{directory or 'this session'} is not a decoder exported with its KV cache "
                                   "(inputs past_key_values.N.key/value, outputs logits and present.N.key/value)")
        first = next(i for i in session.get_inputs() if i.name == self.past_names[0])
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.kv_dtype = np.float16 if "float16" in first.type else np.float32
        self.layers = len(self.past_names) // 2

    @classmethod
    def from_pretrained(cls, directory, threads: int | None = None, provider: str = "CPUExecutionProvider",
                        **_ignored):
        """Load an export directory (``model.onnx`` with ``config.json``; ``generation_config.json`` if present)."""
        import onnxruntime as ort

        directory = Path(directory)
        path = onnx_file(directory)
        if path is None or not (directory / "config.json").is_file():
            raise NotAnExportError(f"{str(directory)!r} is not an ONNX export (needs model.onnx and config.json); "
                                   "make one with `qtrain export --onnx`")
        config = AutoConfig.from_pretrained(directory)
        session = ort.InferenceSession(str(path), session_options(threads), providers=[provider])
        model = cls(config, session, directory)
        if (directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory)
        return model

    # transformers asks a model for its device and dtype; this one has no torch parameters
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def get_input_embeddings(self):  # generate() may ask; there is no torch embedding to give
        return None

    def generate(self, *args, **kwargs):
        # torch's OpenMP workers spin for a while after every op, on the cores onnxruntime's threads need; the
        # per-token torch work in generate() (logits processors on one row) needs no threads. Measured here on
        # the int8 SmolLM2-135M export, 2 cores: 52 tok/s with torch's 2 threads, 69 with 1.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return super().generate(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    def _past_arrays(self, cache, batch: int) -> list[np.ndarray]:
        if isinstance(cache, OnnxCache):
            return cache.arrays
        if cache is not None and cache.get_seq_length() > 0:
            return [t.numpy() for i in range(self.layers) for t in cache_layer(cache, i)]
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return [empty] * (2 * self.layers)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values=None, use_cache: bool = True,
                cache=None, **_ignored) -> CausalLMOutputWithPast:
        past_key_values = past_key_values if past_key_values is not None else cache
        batch, seq = input_ids.shape
        past = self._past_arrays(past_key_values, batch)
        total = past[0].shape[2] + seq
        if attention_mask is None:
            attention_mask = torch.ones(batch, total, dtype=torch.long)
        mask = attention_mask.to(torch.int64)
        feed = {"input_ids": input_ids.to(torch.int64).numpy(), "attention_mask": mask.numpy()}
        if "position_ids" in self.input_names:
            if position_ids is None:  # positions count real tokens, so left padding shifts nothing
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            feed["position_ids"] = position_ids.to(torch.int64).numpy()
        feed.update(zip(self.past_names, past))
        out = dict(zip(self.output_names, self.session.run(None, feed)))
        logits = torch.from_numpy(out["logits"])
        if not use_cache:
            new_cache = None
        elif past_key_values is None or isinstance(past_key_values, OnnxCache) or past_key_values.get_seq_length() == 0:
            # the presents as they came out, fed back next step without a copy (generate() hands an empty
            # DynamicCache to the first step and keeps whichever cache the model returns)
            new_cache = OnnxCache([out[n.replace("past_key_values.", "present.")] for n in self.past_names])
        else:  # a filled torch cache the caller passed: extended in place, as a PyTorch model would
            new_cache, seen = past_key_values, past[0].shape[2]
            for i in range(self.layers):
                new_cache.update(torch.from_numpy(out[f"present.{i}.key"][:, :, seen:]),
                                 torch.from_numpy(out[f"present.{i}.value"][:, :, seen:]), i)
        return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: new_cache})


class OnnxCache(DynamicCache):
    """An export's KV cache as the numpy arrays its session returned (``past_key_values.*`` order)."""

    def __init__(self, arrays: list[np.ndarray]):
        super().__init__()
        self.arrays = arrays

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return int(self.arrays[0].shape[2])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:  # beam search
        index = beam_idx.cpu().numpy()
        self.arrays = [a[index] for a in self.arrays]

    def crop(self, max_length: int) -> None:  # assisted decoding
        if max_length < 0:
            max_length = self.get_seq_length() + max_length
        self.arrays = [a[:, :, :max_length] for a in self.arrays]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.arrays = [np.repeat(a, repeats, axis=0) for a in self.arrays]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.arrays = [a[indices.cpu().numpy()] for a in self.arrays]


def cache_layer(cache, layer: int):
    """(key, value) of one layer of a cache: an :class:`OnnxCache`, a transformers ``Cache`` (4.5x and 5.x), or the
    legacy tuple of tuples."""
    if isinstance(cache, OnnxCache):
        return torch.from_numpy(cache.arrays[2 * layer]), torch.from_numpy(cache.arrays[2 * layer + 1])
    if getattr(cache, "layers", None):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer]


def output_cache(out):
    """The cache of a causal-LM output (``past_key_values`` in transformers 4.x, ``cache`` in 5.2x)."""
    return getattr(out, CACHE_FIELD)
