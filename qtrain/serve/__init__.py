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

Three modules: ``protocol`` (the OpenAI request and response shapes, validated and built without HTTP),
``engine`` (jobs, generation, the scheduler) and ``app`` (the guard middleware, the routes, uvicorn).
"""

from qtrain.serve.app import Guard, create_app, serve
from qtrain.serve.engine import Engine, Job, Scheduler
from qtrain.serve.protocol import APIError, ServeConfig, ServeConfigError

__all__ = ["APIError", "Engine", "Guard", "Job", "Scheduler", "ServeConfig", "ServeConfigError", "create_app", "serve"]
