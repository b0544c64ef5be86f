"""``qtrain serve``: an OpenAI-compatible completion server (FastAPI + uvicorn) and a page to try the model.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (models with a chat template), ``GET /v1/models``,
``GET /health``, and ``GET /`` (a single self-contained page: no build step, no external assets).

Scheduling: generation runs in worker threads, at most ``concurrency`` at once (on a CPU one generation already
uses every core, so the default is 1); the others wait in FIFO order (asyncio's semaphore wakes waiters in
order, so no client starves). At most ``max_queue`` requests wait or run; beyond that the answer is 429, and a
request that waits longer than ``queue_timeout_s`` gets 503. A client that disconnects frees its slot at the next
token; a generation past ``timeout_s`` ends with an error. Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.

Hostile clients (``Guard``, a pure ASGI middleware, so that ``request.is_disconnected`` keeps working): the body
limit is counted while the body is read, chunked or not (413); ``/v1/`` takes only ``application/json`` bodies
(415), so a web page cannot post to it with a CORS-free "simple" request; and without an API key the Host header
must name this server (403), so a DNS-rebinding page cannot reach a loopback server either.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qtrain.infer import Loaded, cut_at_stops

log = logging.getLogger("qtrain.serve")


@dataclass
class ServeConfig:
    model_id: str = "qtrain"
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # the largest max_tokens a request may ask for
    max_queue: int = 16  # requests waiting or running
    concurrency: int = 1
    timeout_s: float = 120.0  # one generation
    queue_timeout_s: float = 60.0  # waiting for a slot
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    # Host names a keyless server answers to (the bound address is added by ``qtrain serve``)
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- requests

class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields qtrain ignores (user, presence_penalty=0, ...)

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    seed: int | None = Field(None, ge=0, lt=2**63)


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # image_url and the like: accepted, not used
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        # pydantic reports a failed union against its first member ("content.str: Input should be a valid
        # string"), which hides the part that is wrong; name it here instead
        if isinstance(value, list):
            for i, part in enumerate(value):
                if not isinstance(part, dict):
                    raise ValueError(f"content part {i} must be an object like {{'type': 'text', 'text': '...'}}")
                if part.get("text") is not None and not isinstance(part["text"], str):
                    raise ValueError(f"content part {i}: text must be a string, not {type(part['text']).__name__}")
        elif value is not None and not isinstance(value, str):
            raise ValueError(f"content must be a string or a list of parts, not {type(value).__name__}")
        return value


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or None
        raise APIError(400, f"{where}: {err['msg']}" if where else err["msg"], param=where) from None


# ---------------------------------------------------------------------------------------------- generation

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

            # reuse the session ORTModelForCausalLM already holds (a second one would double the memory)
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
        from qtrain.infer import _text_pieces

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
        yield from cut_at_stops(_text_pieces(self.tok, counted(), set()), job.stop, found)
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

        loop.run_in_executor(self.executor, work).add_done_callback(release)
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
            if job.finish_reason == "timeout":
                raise APIError(504, f"generation exceeded the server's limit of {self.cfg.timeout_s:g} s",
                               type="server_error", code="timeout")
        finally:
            job.cancel.set()  # finished, failed, or the client went away: the worker stops at its next token


# ---------------------------------------------------------------------------------------------- the app

class Guard:
    """Pure ASGI middleware in front of ``/v1/``: API key, Host, content type, and a body limit that counts bytes
    as they arrive. FastAPI's ``@app.middleware("http")`` would wrap ``receive`` and break disconnect detection
    for non-streaming requests, so this one reads the body itself and replays it to the app, then hands the
    app the real ``receive`` (which reports the disconnect)."""

    def __init__(self, app, cfg: ServeConfig):
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = self._check(scope, headers)
        if error is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, error = await self._read_body(receive)
            if error is None:
                receive = self._replay(body, receive)
        if error is not None:
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope, headers: dict) -> APIError | None:
        cfg = self.cfg
        if cfg.api_key:
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                return APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                type="authentication_error", code="invalid_api_key")
        elif _host_name(headers.get("host", "")) not in {h.lower() for h in cfg.allowed_hosts}:
            return APIError(403, f"Host {headers.get('host', '')!r} is not this server's name; a server without an API "
                                 "key answers only to " + ", ".join(cfg.allowed_hosts) + " (qtrain serve --api-key, "
                                 "or --allow-host NAME)", type="permission_error", code="host_not_allowed")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return APIError(415, f"content-type {media or 'missing'!r}: the API takes application/json",
                                code="unsupported_media_type")
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > cfg.max_body_bytes:
                return APIError(413, f"request body of {length} bytes is over the limit of {cfg.max_body_bytes}",
                                code="body_too_large")
        return None

    async def _read_body(self, receive) -> tuple[bytes, APIError | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", APIError(400, "the client went away while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.cfg.max_body_bytes:
                return b"", APIError(413, f"request body is over the limit of {self.cfg.max_body_bytes} bytes",
                                     code="body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    @staticmethod
    def _replay(body: bytes, receive):
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def _host_name(host: str) -> str:
    """The name part of a Host header: ``localhost:8000`` -> ``localhost``, ``[::1]:8000`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def create_app(loaded: Loaded, cfg: ServeConfig, threads: int | None = None):
    engine = Engine(loaded, threads)
    sched = Scheduler(engine, cfg)
    app = FastAPI(title="qtrain serve", version="1", docs_url=None, redoc_url=None)
    app.state.scheduler = sched
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    app.add_middleware(Guard, cfg=cfg)

    def check_common(req: _Request, max_tokens: int | None) -> tuple[int, list[str]]:
        if req.model not in (None, "", cfg.model_id):
            raise APIError(404, f"model {req.model!r} does not exist here; this server serves {cfg.model_id!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        if req.n != 1:
            raise APIError(400, "n must be 1 here (one completion per request)", param="n")
        if max_tokens is None:
            max_tokens = cfg.max_tokens
        if not 1 <= max_tokens <= cfg.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows 1 to {cfg.max_tokens} "
                                "(qtrain serve --max-tokens)", param="max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(len(x) > 256 for x in stop):
            raise APIError(400, f"at most 4 stop sequences of up to 256 characters, got {len(stop)}", param="stop")
        return max_tokens, stop

    def make_job(text: str, req: _Request, max_tokens: int, stop: list[str], param: str) -> Job:
        ids = engine.encode(text)
        limit = min(cfg.max_prompt_tokens, engine.context - max_tokens)
        if len(ids) > limit:
            raise APIError(400, f"the prompt is {len(ids)} tokens; the limit is {limit} (at most "
                                f"{cfg.max_prompt_tokens} prompt tokens, and prompt + max_tokens within the model's "
                                f"{engine.context})", param=param, code="context_length_exceeded")
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        # below 1e-4 the logits / temperature overflow float32 (NaN probabilities); that limit is greedy anyway
        temperature = req.temperature if req.temperature >= 1e-4 else 0.0
        return Job(ids, max_tokens, temperature, req.top_p, stop, req.seed)

    def usage(job: Job) -> dict:
        n = len(job.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": job.completion_tokens,
                "total_tokens": n + job.completion_tokens}

    def finish(job: Job) -> str:
        return "stop" if job.finish_reason == "stop" else "length"

    async def collect(request: Request, job: Job) -> str:
        """Run a non-streaming job; if the client disconnects meanwhile, cancel it."""
        queue = await sched.start(job)

        async def gather() -> str:
            return "".join([p async for p in sched.pieces(job, queue)])

        task = asyncio.ensure_future(gather())
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                job.cancel.set()

    def sse(obj: dict | str) -> bytes:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()

    async def stream(job: Job, chunk, include_usage: bool) -> StreamingResponse:
        queue = await sched.start(job)  # 429/503 are plain HTTP errors, before the stream starts

        async def events():
            try:
                async for piece in sched.pieces(job, queue):
                    yield sse(chunk(piece, None))
            except APIError as exc:  # mid-stream (timeout, failure): OpenAI sends an error event
                yield sse(exc.body())
                yield sse("[DONE]")
                return
            yield sse(chunk("", finish(job)))
            if include_usage:
                yield sse({**chunk("", None), "choices": [], "usage": usage(job)})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_id, "backend": loaded.kind, "chat": engine.is_chat,
                "queue": {"admitted": sched.admitted, "running": sched.running, "limit": cfg.max_queue,
                          "served": sched.served},
                "limits": {"max_tokens": cfg.max_tokens, "max_prompt_tokens": cfg.max_prompt_tokens,
                           "timeout_s": cfg.timeout_s}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_id, "object": "model", "created": created,
                                            "owned_by": "qtrain"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str):
        if model_id != cfg.model_id:
            raise APIError(404, f"model {model_id!r} does not exist here; this server serves {cfg.model_id!r}",
                           param="model", code="model_not_found")
        return {"id": cfg.model_id, "object": "model", "created": created, "owned_by": "qtrain"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(CompletionRequest, await request.body())
        for key, bad in (("echo", req.echo), ("logprobs", req.logprobs is not None), ("suffix", req.suffix)):
            if bad:
                raise APIError(400, f"{key} is not supported by qtrain serve", param=key)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt must be one string (batches of prompts are not supported)", param="prompt")
            prompt = prompt[0]
        max_tokens, stop = check_common(req, req.max_tokens)
        job = make_job(prompt, req, max_tokens, stop, "prompt")
        cid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str, reason: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": now, "model": cfg.model_id,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

        if req.stream:
            return await stream(job, chunk, bool((req.stream_options or {}).get("include_usage")))
        text = await collect(request, job)
        return {**chunk(text, finish(job)), "usage": usage(job)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = _parse(ChatRequest, await request.body())
        max_tokens, stop = check_common(req, req.max_completion_tokens if req.max_completion_tokens is not None
                                        else req.max_tokens)
        job = make_job(engine.chat_text(req.messages), req, max_tokens, stop, "messages")
        cid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        sent_role = []

        def chunk(text: str, reason: str | None) -> dict:
            delta = {} if reason else {"content": text}
            if not sent_role:
                delta = {"role": "assistant", **delta}
                sent_role.append(True)
            return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": cfg.model_id,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        if req.stream:
            return await stream(job, chunk, bool((req.stream_options or {}).get("include_usage")))
        text = await collect(request, job)
        return {"id": cid, "object": "chat.completion", "created": now, "model": cfg.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish(job)}], "usage": usage(job)}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        from importlib.resources import files

        return (files("qtrain") / "static" / "serve.html").read_text(encoding="utf-8")

    return app


def serve(loaded: Loaded, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          threads: int | None = None) -> None:
    import uvicorn

    app = create_app(loaded, cfg, threads)
    # connections beyond this get uvicorn's 503 before any work: memory stays bounded under a flood
    uvicorn.run(app, host=host, port=port, log_level="info", limit_concurrency=cfg.max_queue * 4 + 16,
                timeout_graceful_shutdown=5)
