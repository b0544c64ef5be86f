"""Load any model qtrain can run for inference: a run directory, an ONNX export, a hub id / local model / .gguf,
or the embedded default; and stream text from it.

One loader for ``qtrain generate``, ``qtrain eval`` and ``qtrain serve``, so all three accept the same things.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from qtrain.errors import QtrainError
from qtrain.export.decoder import OnnxDecoder, default_threads, onnx_file, pick, session_options  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


class InferenceError(QtrainError, ValueError):
    pass


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    kind: str  # "pytorch" | "onnx"
    name: str
    info: dict = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        """An instruct model: its tokenizer carries a chat template."""
        return bool(getattr(self.tokenizer, "chat_template", None))


def load_onnx(directory: Path, threads: int | None = None):
    """An ONNX export as a transformers-compatible model (:class:`qtrain.export.runtime.OnnxForCausalLM`)."""
    from qtrain.export.runtime import NotAnExportError, OnnxForCausalLM

    try:
        return OnnxForCausalLM.from_pretrained(directory, threads=threads)
    except NotAnExportError as exc:
        raise InferenceError(str(exc)) from None


def load_for_inference(ref: str | os.PathLike | None, *, threads: int | None = None, merge: bool = True) -> Loaded:
    """Load ``ref`` for generation. LoRA runs are merged into their base (faster; same function)."""
    import torch
    from transformers import AutoTokenizer

    from qtrain.models import ensure_pad_token, load_model, load_tokenizer, resolve_model_source

    if threads:
        torch.set_num_threads(threads)
    path = Path(ref) if ref is not None else None
    if path is not None and path.is_dir() and onnx_file(path) is not None:
        if not (path / "config.json").is_file():
            raise InferenceError(f"ONNX directory {str(path)!r} has no config.json; export it with `qtrain export --onnx`")
        model = load_onnx(path, threads)
        tok = AutoTokenizer.from_pretrained(path)
        ensure_pad_token(tok)
        return Loaded(model, tok, "onnx", str(path), {"file": onnx_file(path).name, "path": str(path)})
    from qtrain.runs import is_run_dir, read_run

    if is_run_dir(path):
        from qtrain.runs import load_merged, load_trained

        model = load_merged(path)[0] if merge else load_trained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        ensure_pad_token(tok)
        return Loaded(model, tok, "pytorch", str(path), {"run": read_run(path)})
    source = resolve_model_source(None if ref is None else str(ref))
    from qtrain.bitnet import is_bitnet_dir, load_packed

    model = load_packed(path) if path is not None and is_bitnet_dir(path) else load_model(source)
    model.eval()
    return Loaded(model, load_tokenizer(source), "pytorch", source.name)


def stream_generate(loaded: Loaded, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0,
                    top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                    chat: bool = False) -> Iterator[str]:
    """Yield the completion of ``prompt`` piece by piece (greedy when temperature is 0); stops at EOS or ``stop``."""
    from threading import Event, Thread

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    halt = Event()

    class _Halt(StoppingCriteria):
        # lets the consumer end generation early (stop sequence found, client gone)
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), halt.is_set(), dtype=torch.bool)

    tok = loaded.tokenizer
    text = prompt
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False, return_token_type_ids=False)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(enc, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tok.pad_token_id,
                  stopping_criteria=StoppingCriteriaList([_Halt()]))
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(seed)
    errors: list[BaseException] = []

    def run():
        try:
            with torch.inference_mode():
                loaded.model.generate(**kwargs)
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)
            streamer.end()

    if loaded.kind == "onnx" and loaded.info.get("path"):
        # the lean loop on the session (see OnnxDecoder): ~2x the tokens/s of generate() for small models
        import numpy as np

        dec = loaded.info.get("decoder") or OnnxDecoder(session=getattr(loaded.model, "session", None),
                                                        directory=Path(loaded.info["path"]))
        loaded.info["decoder"] = dec
        eos = {t for t in (tok.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None))
               if isinstance(t, int)}
        token_iter = dec.generate(enc["input_ids"][0].tolist(), max_new_tokens, eos, temperature, top_p,
                                  np.random.default_rng(seed))
        streamer = text_pieces(tok, token_iter, eos)
        worker = None
    else:
        worker = Thread(target=run, daemon=True)
        worker.start()
    try:
        yield from cut_at_stops(streamer, stop)
    finally:
        halt.set()  # also when the consumer stops iterating (GeneratorExit)
        if worker is not None:
            worker.join(timeout=30)
    if errors:
        raise errors[0]


def cut_at_stops(pieces: Iterator[str], stop: list[str] | None, found: list | None = None) -> Iterator[str]:
    """Pass text pieces through until one of the ``stop`` strings appears (not included). A stop string may
    arrive split over pieces, so the last ``len(longest stop) - 1`` characters are held back until it is
    certain they do not start one. Appends the stop string to ``found`` when one ended the text."""
    stops = [s for s in (stop or []) if s]
    hold = max((len(s) for s in stops), default=1) - 1
    emitted, sent = "", 0
    for piece in pieces:
        emitted += piece
        hits = [(i, s) for s in stops if (i := emitted.find(s)) >= 0]
        if hits:
            cut, which = min(hits)
            if cut > sent:
                yield emitted[sent:cut]
            if found is not None:
                found.append(which)
            return
        if len(emitted) - hold > sent:
            yield emitted[sent:len(emitted) - hold]
            sent = len(emitted) - hold
    if sent < len(emitted):
        yield emitted[sent:]


def text_pieces(tok, token_iter, eos: set[int]) -> Iterator[str]:
    """Decode a stream of token ids into text pieces (whole characters only; EOS not shown)."""
    ids: list[int] = []
    shown = ""
    for t in token_iter:
        if t in eos:
            break
        ids.append(t)
        text = tok.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            continue
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text


# ----------------------------------------------------------------------------------------- lean decode loops

def torch_tokens(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int] | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, rng=None) -> Iterator[int]:
    """:func:`torch_decode` with sampling (temperature, top-p) done like :class:`OnnxDecoder`'s, for the server."""
    import numpy as np
    import torch

    rng = rng or np.random.default_rng()
    ids = torch.tensor([prompt_ids])
    past = None
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1]
            token = int(logits.argmax()) if temperature <= 0 else pick(logits.double().numpy(), temperature, top_p, rng)
            yield token
            if eos_ids and token in eos_ids:
                return
            ids = torch.tensor([[token]])


def torch_decode(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int] | None = None) -> Iterator[int]:
    """The same lean greedy loop for a PyTorch model (forward with its KV cache, argmax), for fair timing."""
    yield from torch_tokens(model, prompt_ids, max_new_tokens, eos_ids)
