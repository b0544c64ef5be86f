"""`qtrain serve` under load: throughput and latency for 1, 4 and 16 concurrent clients, PyTorch vs int8 ONNX.

Each backend runs as a real server process (`qtrain serve`) on loopback; clients are threads with their own
HTTP connection, each sending a fixed number of greedy completion requests (same prompt set, max_tokens fixed)
one after the other. Reported per backend and concurrency: completion tokens/s across all clients, requests/s,
and p50/p95 latency of a request. The int8 ONNX export of the default model is made first (or reused).
Writes benchmarks/results/serve_load.{json,md}.

    python benchmarks/serve_load.py [--onnx-dir DIR] [--max-tokens 32] [--requests-per-client 8,3,2]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import header  # noqa: E402 - benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = ["def is_prime(n):\n", "def merge_sort(items):\n", "class Stack:\n    def __init__(self):\n",
           "def read_json(path):\n", "def fibonacci(n):\n", "def parse_args(argv):\n"]
CONCURRENCY = (1, 4, 16)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _port()
    cmd = [sys.executable, "-m", "qtrain", "serve", *([model] if model else []), "--port", str(port),
           "--threads", str(threads), "--queue", "64", "--model-name", "m"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def drive(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    import httpx

    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=600) as c:
            for j in range(per_client):
                body = {"model": "m", "prompt": PROMPTS[(i + j) % len(PROMPTS)], "max_tokens": max_tokens,
                        "temperature": 0}
                t = time.perf_counter()
                r = c.post(url + "/v1/completions", json=body)
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        tokens.append(r.json()["usage"]["completion_tokens"])
                    else:
                        errors.append(f"{r.status_code} {r.text[:100]}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else lat * 19
    return {"clients": clients, "requests": clients * per_client, "ok": len(lat), "errors": errors[:5],
            "wall_seconds": round(wall, 2), "completion_tokens": sum(tokens),
            "tokens_per_second": round(sum(tokens) / wall, 2), "requests_per_second": round(len(lat) / wall, 3),
            "latency_p50_s": round(statistics.median(lat), 3), "latency_p95_s": round(q[18], 3)}


def render(result: dict) -> None:
    from qtrain.io import atomic_write_text

    m = result["machine"]
    lines = ["# `qtrain serve` under load (default model, CPU)", "",
             f"Machine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}; git {result['git']}. "
             f"Reproduce: `{result['command']}`.", "",
             f"Greedy completions of {result['max_tokens']} tokens (6 short code prompts), each client sends its "
             "requests one after another; the server generates one request at a time (`--concurrency 1`, FIFO "
             "queue), so throughput stays flat and latency grows with the number of clients.", "",
             "| backend | clients | requests | completion tok/s | requests/s | p50 latency (s) | p95 latency (s) | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for backend, rows in result["backends"].items():
        for r in rows:
            lines.append(f"| {backend} | {r['clients']} | {r['requests']} | {r['tokens_per_second']:.1f} | "
                         f"{r['requests_per_second']:.2f} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | "
                         f"{r['requests'] - r['ok']} |")
    atomic_write_text(RESULTS / "serve_load.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx-dir", help="an existing int8 ONNX export of the default model (made if missing)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests-per-client", default="8,3,2", help="for 1, 4 and 16 clients")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        render(json.loads((RESULTS / "serve_load.json").read_text()))
        return
    from qtrain.io import atomic_write_json

    per = [int(x) for x in args.requests_per_client.split(",")]
    onnx = Path(args.onnx_dir) if args.onnx_dir else Path(tempfile.mkdtemp(prefix="qtrain-serve-bench-")) / "onnx"
    if not (onnx / "int8" / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "qtrain", "export", "--onnx", "--int8", "-o", str(onnx), "--overwrite",
                        "--no-speed"],
                       cwd=ROOT, check=True)
    backends = {}
    for name, model in (("PyTorch fp32", None), ("ONNX int8", str(onnx / "int8"))):
        proc, url = start_server(model, args.threads)
        try:
            drive(url, 1, 2, 8)  # warm up
            backends[name] = [drive(url, c, n, args.max_tokens) for c, n in zip(CONCURRENCY, per)]
            print(name, json.dumps(backends[name]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result = header("serve_load", max_tokens=args.max_tokens, command=f"python benchmarks/serve_load.py --max-tokens {args.max_tokens} "
                         f"--requests-per-client {args.requests_per_client}", backends=backends)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "serve_load.json", result)
    render(result)


if __name__ == "__main__":
    main()
