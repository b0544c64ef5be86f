"""The HTTP side of ``qtrain serve``: the :class:`Guard` middleware, the routes, and uvicorn.

Hostile clients (``Guard``, a pure ASGI middleware, so that ``request.is_disconnected`` keeps working): the body
limit is counted while the body is read, chunked or not (413); ``/v1/`` takes only ``application/json`` bodies
(415), so a web page cannot post to it with a CORS-free "simple" request; and without an API key the Host header
must name this server (403), so a DNS-rebinding page cannot reach a loopback server either.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from qtrain.infer import Loaded
from qtrain.serve.engine import Engine, Job, Scheduler
from qtrain.serve.protocol import (APIError, ChatChunks, ChatRequest, CompletionChunks, CompletionRequest, ServeConfig,
                                   check_limits, completion_prompt, finish_reason, parse_request,
                                   sampling_temperature, sse, usage)


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

    def make_job(text: str, req, max_tokens: int, stop: list[str], param: str) -> Job:
        ids = engine.encode(text)
        limit = min(cfg.max_prompt_tokens, engine.context - max_tokens)
        if len(ids) > limit:
            raise APIError(400, f"the prompt is {len(ids)} tokens; the limit is {limit} (at most "
                                f"{cfg.max_prompt_tokens} prompt tokens, and prompt + max_tokens within the model's "
                                f"{engine.context})", param=param, code="context_length_exceeded")
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        return Job(ids, max_tokens, sampling_temperature(req.temperature), req.top_p, stop, req.seed)

    async def respond(request: Request, req, job: Job, chunks):
        """The whole response, or a stream of chunks when the request asked for one."""
        if req.stream:
            return await stream(job, chunks, bool((req.stream_options or {}).get("include_usage")))
        text = await collect(request, job)
        return chunks.response(text, finish_reason(job.finish_reason),
                               usage(len(job.prompt_ids), job.completion_tokens))

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

    async def stream(job: Job, chunks, include_usage: bool) -> StreamingResponse:
        queue = await sched.start(job)  # 429/503 are plain HTTP errors, before the stream starts

        async def events():
            try:
                async for piece in sched.pieces(job, queue):
                    yield sse(chunks.chunk(piece, None))
            except APIError as exc:  # mid-stream (timeout, failure): OpenAI sends an error event
                yield sse(exc.body())
                yield sse("[DONE]")
                return
            yield sse(chunks.chunk("", finish_reason(job.finish_reason)))
            if include_usage:
                yield sse({**chunks.chunk("", None), "choices": [],
                           "usage": usage(len(job.prompt_ids), job.completion_tokens)})
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
        req = parse_request(CompletionRequest, await request.body())
        prompt = completion_prompt(req)
        max_tokens, stop = check_limits(req, req.max_tokens, cfg)
        job = make_job(prompt, req, max_tokens, stop, "prompt")
        return await respond(request, req, job, CompletionChunks(cfg.model_id))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_request(ChatRequest, await request.body())
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens, stop = check_limits(req, asked, cfg)
        job = make_job(engine.chat_text(req.messages), req, max_tokens, stop, "messages")
        return await respond(request, req, job, ChatChunks(cfg.model_id))

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
