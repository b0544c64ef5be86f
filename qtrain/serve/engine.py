"""Generation for ``qtrain serve``: a :class:`Job` per request, the :class:`Engine` that turns it into text pieces
with the loaded model (PyTorch or ONNX), and the :class:`Scheduler` that admits jobs to a bounded number of worker
threads in FIFO order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from qtrain.infer import Loaded, cut_at_stops, text_pieces
from qtrain.serve.protocol import APIError, ChatMessage, ServeConfig

log = logging.getLogger("qtrain.serve")

@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float = float("inf")
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_s: float | None = None
    worker: Any = None  # the worker thread's future; its done-callback frees the slot


class Engine:
    """Turns a :class:`Job` into text pieces with the loaded model (PyTorch or ONNX), one token at a time."""

    def __init__(self, loaded: Loaded, threads: int | None = None):
        self.loaded = loaded
        self.tok = loaded.tokenizer
        gen = getattr(loaded.model, "generation_config", None)
        eos = [self.tok.eos_token_id, getattr(gen, "eos_token_id", None)]
        self.eos = {t for e in eos for t in (e if isinstance(e, list) else [e]) if isinstance(t, int)}
        cfg = loaded.model.config
        self.context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        self.decoder = None
        if loaded.kind == "onnx":
            from pathlib import Path

            from qtrain.infer import OnnxDecoder

            # reuse the session OnnxForCausalLM already holds (a second one would double the memory)
            self.decoder = OnnxDecoder(Path(loaded.info["path"]), threads, session=getattr(loaded.model, "session", None))

    @property
    def is_chat(self) -> bool:
        return self.loaded.is_chat

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def chat_text(self, messages: list[ChatMessage]) -> str:
        if not self.is_chat:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages",
                           code="chat_not_supported")
        msgs = []
        for m in messages:
            content = m.content
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.text or "" for p in content if p.type == "text")
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def _tokens(self, job: Job) -> Iterator[int]:
        import numpy as np

        rng = np.random.default_rng(job.seed)
        if self.decoder is not None:
            return self.decoder.generate(job.prompt_ids, job.max_tokens, self.eos, job.temperature, job.top_p, rng)
        from qtrain.infer import torch_tokens

        return torch_tokens(self.loaded.model, job.prompt_ids, job.max_tokens, self.eos, job.temperature, job.top_p, rng)

    def pieces(self, job: Job) -> Iterator[str]:
        """Text pieces of the completion; sets ``job.finish_reason`` (stop, length, timeout, cancelled)."""
        start = time.monotonic()

        def counted() -> Iterator[int]:
            for t in self._tokens(job):
                if job.cancel.is_set():
                    job.finish_reason = "cancelled"
                    return
                if time.monotonic() > job.deadline:
                    job.finish_reason = "timeout"
                    return
                if t in self.eos:
                    job.finish_reason = "stop"
                    return
                if job.first_token_s is None:
                    job.first_token_s = time.monotonic() - start
                job.completion_tokens += 1
                yield t
            job.finish_reason = job.finish_reason or "length"

        found: list[str] = []
        yield from cut_at_stops(text_pieces(self.tok, counted(), set()), job.stop, found)
        if found:
            job.finish_reason = "stop"


class Scheduler:
    """Bounded FIFO admission to ``concurrency`` generation threads."""

    def __init__(self, engine: Engine, cfg: ServeConfig):
        self.engine, self.cfg = engine, cfg
        self.executor = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="qtrain-gen")
        self.slots: asyncio.Semaphore | None = None
        self.admitted = 0  # waiting + running
        self.running = 0
        self.served = 0

    async def start(self, job: Job) -> asyncio.Queue:
        """Admit ``job`` (429 when the queue is full), wait for a slot in FIFO order (503 after
        ``queue_timeout_s``), and start generating; returns the queue its pieces arrive on. Once started, the job
        releases its slot when its worker thread ends, whether or not anyone reads the pieces."""
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.cfg.concurrency)
        if self.admitted >= self.cfg.max_queue:
            raise APIError(429, f"the server is busy ({self.admitted} requests waiting or running, the limit is "
                                f"{self.cfg.max_queue}); retry shortly", type="rate_limit_error", code="queue_full")
        self.admitted += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), self.cfg.queue_timeout_s)
        except asyncio.TimeoutError:
            self.admitted -= 1
            raise APIError(503, f"no generation slot became free within {self.cfg.queue_timeout_s:g} s; retry later",
                           type="server_error", code="queue_timeout") from None
        except BaseException:  # cancelled while waiting (client gone)
            self.admitted -= 1
            raise
        self.running += 1
        job.deadline = time.monotonic() + self.cfg.timeout_s
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def post(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        def work() -> None:
            try:
                for piece in self.engine.pieces(job):
                    post("piece", piece)
            except BaseException as exc:  # surfaced to the request by pieces()
                post("error", exc)
            finally:
                post("end", None)

        def release(_fut) -> None:  # the slot is free only when the worker thread really stopped
            self.running -= 1
            self.admitted -= 1
            self.served += 1
            self.slots.release()

        job.worker = loop.run_in_executor(self.executor, work)
        job.worker.add_done_callback(release)
        return queue

    async def pieces(self, job: Job, queue: asyncio.Queue) -> AsyncIterator[str]:
        try:
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    yield value
                elif kind == "error":
                    log.error("generation failed: %s: %s", type(value).__name__, value)
                    raise APIError(500, f"generation failed: {type(value).__name__}: {value}", type="server_error")
                else:
                    break
            # the worker posts "end" just before it returns; waiting for it means the slot is free before the
            # response completes, so a client's next request never finds its own last one still holding it
            await job.worker
            if job.finish_reason == "timeout":
                raise APIError(504, f"generation exceeded the server's limit of {self.cfg.timeout_s:g} s",
                               type="server_error", code="timeout")
        finally:
            job.cancel.set()  # finished, failed, or the client went away: the worker stops at its next token
