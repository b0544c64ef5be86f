"""qtrain serve: the OpenAI API with the official client, errors, limits, the queue, a load test, the page in Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from qtrain.serve import APIError, Engine, Job, Scheduler, ServeConfig, create_app  # noqa: E402

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "qtrain", "serve", str(model_dir), "--port", str(self.port),
                                      "--threads", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        import httpx

        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not come up in 90 s")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(chat_model_dir):
    s = Server(chat_model_dir, "--max-tokens", "48", "--queue", "16", "--model-name", "tiny")
    yield s
    s.stop()


# ------------------------------------------------------------------------------------------- OpenAI client

def test_openai_client_completions_chat_and_streaming(server):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="def add(a, b):\n", max_tokens=12, temperature=0)
    text = r.choices[0].text
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # greedy: the streamed pieces concatenate to the same text
    chunks = list(client.completions.create(model="tiny", prompt="def add(a, b):\n", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # a stop sequence taken from inside that text ends the completion just before it
    if len(text.strip()) > 3:
        stop = text[len(text) // 2:len(text) // 2 + 2]
        cut = client.completions.create(model="tiny", prompt="def add(a, b):\n", max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    # sampling with a seed is reproducible
    a = client.completions.create(model="tiny", prompt="import os\n", max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = client.completions.create(model="tiny", prompt="import os\n", max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert a.choices[0].text == b.choices[0].text

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=10,
                                          temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    streamed = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                   max_tokens=10, temperature=0, stream=True,
                                                   stream_options={"include_usage": True}))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    assert streamed[-1].usage.completion_tokens == chat.usage.completion_tokens
    with pytest.raises(NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    import httpx

    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "def f():", "max_tokens": 48,
                                                                    "temperature": 0.8, "stream": True}) as resp:
        assert resp.status_code == 200
        next(resp.iter_lines())  # one event, then hang up
    deadline = time.time() + 10
    while time.time() < deadline:
        h = httpx.get(server.url + "/health").json()
        if h["queue"]["admitted"] == 0:
            break
        time.sleep(0.1)
    assert h["queue"]["admitted"] == 0 and h["queue"]["running"] == 0
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_load_200_requests_from_16_clients(server):
    """Every request ends with a completion or a documented error; the server stays up; its memory stays bounded."""
    import httpx

    warm = [httpx.post(server.url + "/v1/completions", json={"prompt": "def f(x):", "max_tokens": 16}) for _ in range(5)]
    assert all(r.status_code == 200 for r in warm)
    rss_before = server.rss_bytes()
    statuses: list[int] = []
    bad: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            for j in range(200 // 16 + 1):
                n = i * 13 + j
                if n >= 200:
                    return
                body = {"prompt": f"def f{n}(x):\n    return", "max_tokens": 16, "temperature": 0.7, "seed": n,
                        "stream": n % 3 == 0}
                r = c.post(server.url + "/v1/completions", json=body)
                ok = r.status_code == 200 and (body["stream"] and r.text.rstrip().endswith("data: [DONE]")
                                               or not body["stream"] and "choices" in r.json())
                documented = r.status_code in (429, 503) and "error" in r.json()
                with lock:
                    statuses.append(r.status_code)
                    if not (ok or documented):
                        bad.append(f"{r.status_code}: {r.text[:200]}")

    start = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a client did not finish in 300 s"
    assert len(statuses) == 200 and not bad, bad[:3]
    assert statuses.count(200) >= 150  # the queue (16) holds all 16 clients; 429s only in a burst
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["queue"]["admitted"] == 0
    grown = server.rss_bytes() - rss_before
    assert grown < 150 * 2**20, f"server RSS grew {grown / 2**20:.0f} MiB over 200 requests"
    print(f"load: 200 requests in {time.time() - start:.1f} s, statuses {dict((s, statuses.count(s)) for s in set(statuses))}, "
          f"RSS growth {grown / 2**20:.1f} MiB")


# ------------------------------------------------------------------------------------- errors (in process)

@pytest.fixture(scope="module")
def loaded_tiny(tiny_model_dir):
    from qtrain.infer import load_for_inference

    return load_for_inference(str(tiny_model_dir), threads=1)


def _client(loaded, **cfg) -> TestClient:
    return TestClient(create_app(loaded, ServeConfig(model_id="tiny", **cfg), threads=1), base_url="http://127.0.0.1")


def test_bad_requests_get_openai_shaped_4xx(loaded_tiny):
    c = _client(loaded_tiny, max_tokens=32, max_prompt_tokens=64, max_body_bytes=4096)
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"max_tokens": 4}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x", "max_tokens": 33}).encode(), 400, "allows 1 to 32"),
        (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400, "allows 1 to 32"),
        (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"prompt": "x", "temperature": 3}).encode(), 400, "temperature"),
        (json.dumps({"prompt": "x", "n": 2}).encode(), 400, "n must be 1"),
        (json.dumps({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "at most 4"),
        (json.dumps({"prompt": "x", "echo": True}).encode(), 400, "echo"),
        (json.dumps({"prompt": "x", "seed": -1}).encode(), 400, "seed"),
        (json.dumps({"prompt": "x", "max_tokens": 1e30}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "x", "stop": "s" * 300}).encode(), 400, "256 characters"),
        (json.dumps({"prompt": 123}).encode(), 400, "prompt"),
        (json.dumps({"prompt": ["a", "b"]}).encode(), 400, "one string"),
        (json.dumps({"prompt": ""}).encode(), 400, "empty"),
        (json.dumps({"prompt": "def f(): pass\n" * 40}).encode(), 400, "limit is"),
        (json.dumps({"prompt": "x", "model": "other"}).encode(), 404, "does not exist"),
        (json.dumps({"prompt": "x" * 5000}).encode(), 413, "over the limit"),
    ]
    for body, status, words in cases:
        r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body[:60], r.text)
        err = r.json()["error"]
        assert words in err["message"] and {"message", "type", "param", "code"} <= set(err), (body[:60], err)
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    r = c.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400
    assert c.get("/v1/models/nope").status_code == 404
    page = c.get("/")
    assert page.status_code == 200 and "<script>" in page.text and "http" not in page.text.split("<script>")[1].split(
        "fetch(")[0]  # no external assets


def test_onnx_backend_serves_the_same_greedy_text(loaded_tiny, tiny_model_dir, code_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from qtrain.export.onnx import ExportOptions, export_onnx
    from qtrain.infer import load_for_inference

    export_onnx(str(tiny_model_dir), tmp_path / "onnx", ExportOptions(positions=256, gen_tokens=4, data=str(code_dir),
                                                                     speed=False), say=lambda *_: None)
    onnx_loaded = load_for_inference(str(tmp_path / "onnx"), threads=1)
    body = {"prompt": "def main():\n", "max_tokens": 12, "temperature": 0}
    a = _client(loaded_tiny).post("/v1/completions", json=body).json()
    c = _client(onnx_loaded)
    b = c.post("/v1/completions", json=body).json()
    assert c.get("/health").json()["backend"] == "onnx"
    assert b["choices"][0]["text"] == a["choices"][0]["text"] and b["usage"] == a["usage"]


def test_api_key_is_required_when_set(loaded_tiny):
    c = _client(loaded_tiny, api_key="s3cret")
    body = {"prompt": "x", "max_tokens": 2}
    assert c.post("/v1/completions", json=body).status_code == 401
    r = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # open: no model access


def test_hostile_requests_are_refused_before_any_work(loaded_tiny):
    c = _client(loaded_tiny, max_tokens=8, max_body_bytes=4096)
    ok = {"prompt": "x", "max_tokens": 2}

    def chunked(total: int):
        def body():
            for _ in range(total // 1024):
                yield b"x" * 1024
        return body()

    # a chunked body (no Content-Length) over the limit is counted while it is read
    r = c.post("/v1/completions", content=chunked(64 << 10), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    # cross-site "simple" requests and DNS rebinding
    r = c.post("/v1/completions", content=json.dumps(ok), headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = c.post("/v1/completions", json=ok, headers={"host": "evil.example:8000"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert c.post("/v1/completions", json=ok, headers={"host": host}).status_code == 200, host
    # a key replaces the Host check (a server behind a proxy or on a LAN name)
    keyed = _client(loaded_tiny, api_key="k")
    r = keyed.post("/v1/completions", json=ok, headers={"host": "gpu-box.lan", "authorization": "Bearer k"})
    assert r.status_code == 200
    # fields that a careless server answers with a 500, or silently replaces
    chat = _client(loaded_tiny, max_tokens=8)
    cases = [({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "text"),
             ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400, "allows 1 to 8"),
             ({"messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")}, 400, "temperature")]
    for body, status, words in cases:
        r = chat.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 1e-310})
    assert r.status_code == 200, r.text


def test_a_non_streaming_client_that_hangs_up_cancels_its_generation(loaded_tiny):
    """Driven at the ASGI level: the body arrives, then the client disconnects; the generation must stop long
    before max_tokens (an @app.middleware('http') wrapper would hide the disconnect, and it would run to the end)."""
    app = create_app(loaded_tiny, ServeConfig(model_id="tiny", max_tokens=200, max_prompt_tokens=64), threads=1)
    sched = app.state.scheduler
    sched.engine = _SlowEngine()  # a piece every 20 ms: 200 of them take 4 s unless cancelled
    jobs = []
    original = sched.start

    async def spy(job):
        jobs.append(job)
        return await original(job)

    sched.start = spy
    body = json.dumps({"prompt": "import os\n", "max_tokens": 200}).encode()

    async def drive():
        sent = []
        gone = asyncio.Event()

        async def receive():
            if not sent:
                sent.append(time.monotonic() + 0.3)  # the client hangs up shortly after sending
                return {"type": "http.request", "body": body, "more_body": False}
            # like uvicorn: block while connected, answer at once after the hang-up (starlette's
            # is_disconnected cancels a receive that would block)
            if time.monotonic() < sent[0]:
                await asyncio.sleep(sent[0] - time.monotonic())
            gone.set()
            return {"type": "http.disconnect"}

        async def send(message):
            pass

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                                              (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await asyncio.wait_for(app(scope, receive, send), 60)

    asyncio.run(drive())
    assert jobs and jobs[0].finish_reason == "cancelled", jobs[0].finish_reason if jobs else None


# ------------------------------------------------------------------------------------------ the scheduler

class _SlowEngine:
    """Yields a piece every 20 ms until cancelled or ``n`` pieces; records how many ran at once."""

    def __init__(self, n: int = 10**6):
        self.n, self.active, self.max_active = n, 0, 0
        self.lock = threading.Lock()

    def pieces(self, job: Job):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            for i in range(self.n):
                if job.cancel.is_set():
                    job.finish_reason = "cancelled"
                    return
                if time.monotonic() > job.deadline:
                    job.finish_reason = "timeout"
                    return
                time.sleep(0.02)
                yield "x"
            job.finish_reason = "length"
        finally:
            with self.lock:
                self.active -= 1


def _job() -> Job:
    return Job([1], 8, 0.0, 1.0, [], None)


async def _settled(s: Scheduler) -> None:
    for _ in range(200):
        if s.admitted == 0:
            return
        await asyncio.sleep(0.01)


def test_scheduler_queue_full_429_fifo_cancel_and_timeouts():
    async def scenario():
        eng = _SlowEngine(n=5)
        s = Scheduler(eng, ServeConfig(max_queue=3, concurrency=1, queue_timeout_s=5, timeout_s=5))
        order: list[int] = []

        async def run(i):
            job = _job()
            q = await s.start(job)
            out = "".join([p async for p in s.pieces(job, q)])
            order.append(i)
            return out

        tasks = [asyncio.ensure_future(run(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(APIError) as full:
            await s.start(_job())
        assert full.value.status == 429
        assert await asyncio.gather(*tasks) == ["xxxxx"] * 3
        await _settled(s)  # the slot is released when the worker thread has returned
        assert order == [0, 1, 2] and eng.max_active == 1 and s.admitted == 0  # FIFO, one at a time

        # a consumer that stops reading (client gone) frees the slot: the worker stops at its next piece
        forever = _SlowEngine()
        s2 = Scheduler(forever, ServeConfig(max_queue=2, concurrency=1, queue_timeout_s=0.3, timeout_s=0.5))
        job = _job()
        q = await s2.start(job)
        gen = s2.pieces(job, q)
        assert await gen.__anext__() == "x"
        # while it runs, a second request waits and gives up after queue_timeout_s with 503
        with pytest.raises(APIError) as busy:
            await s2.start(_job())
        assert busy.value.status == 503
        await gen.aclose()
        await _settled(s2)
        assert s2.admitted == 0 and forever.active == 0
        # a generation past timeout_s ends with 504
        job = _job()
        q = await s2.start(job)
        with pytest.raises(APIError) as late:
            async for _ in s2.pieces(job, q):
                pass
        assert late.value.status == 504

    asyncio.run(scenario())


def test_engine_stops_at_eos_and_counts_tokens(loaded_tiny):
    eng = Engine(loaded_tiny, threads=1)
    job = Job(eng.encode("def f(x):"), 6, 0.0, 1.0, [], None)
    text = "".join(eng.pieces(job))
    assert job.finish_reason in ("stop", "length") and job.completion_tokens <= 6
    if job.finish_reason == "length":
        assert job.completion_tokens == 6
    assert isinstance(text, str)


# ------------------------------------------------------------------------------------------- the page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_page_streams_a_completion_in_headless_chromium(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny'", timeout=15000)
            page.fill("#prompt", "def greet(name):\n")
            page.fill("#max_tokens", "24")
            page.fill("#stop", "")
            page.click("#go")
            page.wait_for_function("document.getElementById('completion').textContent.length > 0", timeout=30000)
            page.wait_for_function("!document.getElementById('go').disabled", timeout=30000)
            stats = page.text_content("#stats")
            assert "tokens/s" in stats and page.text_content("#error") == ""
            # what the page shows is what the API returns for the same (greedy) request
            import httpx

            want = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "def greet(name):\n",
                                                                    "max_tokens": 24, "temperature": 0}).json()
            assert page.text_content("#completion") == want["choices"][0]["text"]
            assert page.text_content("#echo") == "def greet(name):\n"
            shot = tmp_path / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)
            out_dir = os.environ.get("QTRAIN_SCREENSHOT_DIR")
            if out_dir:
                shutil.copy(shot, Path(out_dir) / shot.name)
            print(f"screenshot: {shot}; stats: {stats}")
        finally:
            browser.close()


def test_protocol_validates_and_builds_without_http():
    from qtrain.serve.protocol import (ChatChunks, CompletionChunks, CompletionRequest, ServeConfigError,
                                       check_limits, completion_prompt, finish_reason, parse_request)

    cfg = ServeConfig(model_id="m", max_tokens=8)
    req = parse_request(CompletionRequest, b'{"prompt": ["def f():"], "stop": "\\n\\n", "max_tokens": 4}')
    assert completion_prompt(req) == "def f():" and check_limits(req, req.max_tokens, cfg) == (4, ["\n\n"])
    for body, param in ((b'{"prompt": "x", "max_tokens": 9}', "max_tokens"), (b'{"prompt": "x", "n": 2}', "n"),
                        (b'{"prompt": "x", "model": "other"}', "model"), (b'{"prompt": ["a", "b"]}', "prompt"),
                        (b'{"prompt": "x", "echo": true}', "echo"), (b'{"prompt": 5}', "prompt")):
        with pytest.raises(APIError) as err:
            r = parse_request(CompletionRequest, body)
            completion_prompt(r)
            check_limits(r, r.max_tokens, cfg)
        assert err.value.param == param and 400 <= err.value.status < 500, (body, err.value.message)
    chat = ChatChunks("m")
    first, second = chat.chunk("a", None), chat.chunk("b", None)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    assert second["choices"][0]["delta"] == {"content": "b"} and first["id"] == second["id"]
    assert chat.chunk("", "stop")["choices"][0]["delta"] == {}
    done = CompletionChunks("m").response("hi", finish_reason("timeout"), {"total_tokens": 3})
    assert done["choices"][0]["finish_reason"] == "length" and done["usage"] == {"total_tokens": 3}
    for bad in ({"max_tokens": 0}, {"timeout_s": float("nan")}, {"max_queue": -1}, {"api_key": " "}):
        with pytest.raises(ServeConfigError, match=next(iter(bad))):
            ServeConfig(**bad)
