"""Load any model qtrain can run for inference: a run directory, an ONNX export, a hub id / local model / .gguf,
or the embedded default; and stream text from it.

One loader for ``qtrain generate``, ``qtrain eval`` and ``qtrain serve``, so all three accept the same things.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from qtrain.errors import QtrainError

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


def onnx_file(directory: Path) -> Path | None:
    """The decoder file of an ONNX export directory (``model.onnx`` preferred), or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    if (directory / "model.onnx").is_file():
        return directory / "model.onnx"
    files = sorted(directory.glob("*.onnx"))
    return files[0] if files else None


def default_threads() -> int:
    """Physical cores (hyper-threads slow matmul-bound inference down), at least 1."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil always present as a dependency
        n = None
    return max(1, n or os.cpu_count() or 1)


def load_onnx(directory: Path, threads: int | None = None):
    try:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM
    except ImportError as exc:
        raise InferenceError(f"{str(directory)!r} is an ONNX export, which needs the export extra: "
                             f"pip install 'qtrain[export]' ({exc})") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(directory, file_name=onnx_file(directory).name, use_cache=True,
                                                session_options=options, provider="CPUExecutionProvider")
    return model


def load_for_inference(ref: str | os.PathLike | None, *, threads: int | None = None, merge: bool = True) -> Loaded:
    """Load ``ref`` for generation. LoRA runs are merged into their base (faster; same function)."""
    import torch
    from transformers import AutoTokenizer

    from qtrain.models import load_model, load_tokenizer, resolve_model_source

    if threads:
        torch.set_num_threads(threads)
    path = Path(ref) if ref is not None else None
    if path is not None and path.is_dir() and onnx_file(path) is not None:
        if not (path / "config.json").is_file():
            raise InferenceError(f"ONNX directory {str(path)!r} has no config.json; export it with `qtrain export --onnx`")
        model = load_onnx(path, threads)
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return Loaded(model, tok, "onnx", str(path), {"file": onnx_file(path).name})
    if path is not None and (path / "run.json").is_file():
        from qtrain.runs import load_trained

        model = load_trained(path)
        if merge and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model.eval()
        return Loaded(model, tok, "pytorch", str(path), {"run": json.loads((path / "run.json").read_text())})
    source = resolve_model_source(None if ref is None else str(ref))
    model = load_model(source)
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

    worker = Thread(target=run, daemon=True)
    worker.start()
    stops = [s for s in (stop or []) if s]
    hold = max((len(s) for s in stops), default=1) - 1  # a stop sequence may arrive split over pieces
    emitted, sent = "", 0
    try:
        for piece in streamer:
            emitted += piece
            cut = min((i for i in (emitted.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut > sent:
                    yield emitted[sent:cut]
                sent = len(emitted)
                break
            if len(emitted) - hold > sent:
                yield emitted[sent:len(emitted) - hold]
                sent = len(emitted) - hold
        if sent < len(emitted):
            yield emitted[sent:]
    finally:
        halt.set()  # also when the consumer stops iterating (GeneratorExit)
        worker.join(timeout=30)
    if errors:
        raise errors[0]


def timed_generate(loaded: Loaded, prompt: str, **kwargs) -> tuple[str, dict]:
    """Generate and return (text, {"seconds", "tokens", "tokens_per_second"})."""
    start = time.perf_counter()
    text = "".join(stream_generate(loaded, prompt, **kwargs))
    seconds = time.perf_counter() - start
    n = len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
    return text, {"seconds": seconds, "tokens": n, "tokens_per_second": n / seconds if seconds > 0 else 0.0}
