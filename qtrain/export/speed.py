"""Inference speed of one model directory, measured in a fresh process so each runtime's peak memory is its own.

    python -m qtrain.export.speed DIR [--threads N]      # prints one JSON object

``measure_all`` runs it for the PyTorch model and each ONNX format one after the other (side by side in one run,
on the same prompt, same thread count): load time, prefill latency of a 512-token prompt, decode tokens/s at
batch 1 (greedy, KV cache), peak RSS, size on disk.

Decode is timed two ways. The headline uses the same lean loop for every runtime (model call with its KV cache,
argmax; ``infer.torch_decode`` / ``infer.OnnxDecoder``), which is what ``qtrain generate`` runs. The second
column goes through transformers' ``generate`` (``OnnxForCausalLM`` for ONNX), whose per-token Python
overhead (~13 ms here) hides most of what quantization buys.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PREFILL_TOKENS = 512
DECODE_TOKENS = 64
PROMPT = "def quicksort(items):\n    \"\"\"Sort a list with quicksort.\"\"\"\n"


def model_bytes(onnx_path: Path) -> int:
    """Size on disk of an ONNX model with its external data files."""
    d = onnx_path.parent
    files = {onnx_path} | {p for p in d.iterdir() if p.is_file() and p.name.startswith(onnx_path.name + "_data")}
    files |= {p for p in d.iterdir() if p.is_file() and p.suffix == ".data" and p.stem.startswith(onnx_path.stem)}
    return sum(p.stat().st_size for p in files)


def _generate_seconds(model, ids, new_tokens: int) -> float:
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - start


def _lean_seconds(run, ids: list[int], new_tokens: int) -> float:
    start = time.perf_counter()
    n = sum(1 for _ in run(ids, new_tokens))
    assert n == new_tokens
    return time.perf_counter() - start


def measure_llama_cpp(path: Path, threads: int, repeats: int = 3) -> dict:
    """The same figures for a GGUF file in llama.cpp (llama-cpp-python): prefill of 512 tokens, greedy decode."""
    from llama_cpp import Llama

    from qtrain.measure import peak_rss_bytes

    start = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=PREFILL_TOKENS + DECODE_TOKENS + 16, n_threads=threads,
                n_threads_batch=threads, n_batch=PREFILL_TOKENS, verbose=False)
    load_s = time.perf_counter() - start
    ids = llm.tokenize((PROMPT * 64).encode(), add_bos=False)
    long, short = ids[:PREFILL_TOKENS], ids[:16]

    def run(prompt, n):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        for _ in range(n - 1):
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([token])
        return time.perf_counter() - start

    run(short, 4)
    prefill = statistics.median(run(long, 1) for _ in range(repeats))
    one = statistics.median(run(short, 1) for _ in range(repeats))
    full = statistics.median(run(short, DECODE_TOKENS + 1) for _ in range(repeats))
    return {"kind": "llama.cpp", "threads": threads, "load_seconds": round(load_s, 3),
            "prefill_512_ms": round(prefill * 1000, 1),
            "decode_tokens_per_second": round(DECODE_TOKENS / max(1e-9, full - one), 2),
            "peak_rss_bytes": peak_rss_bytes(), "bytes": path.stat().st_size}


def measure(directory: Path, threads: int | None = None, repeats: int = 3) -> dict:
    import torch

    from qtrain.infer import OnnxDecoder, default_threads, load_for_inference, onnx_file, torch_decode
    from qtrain.measure import peak_rss_bytes

    threads = threads or default_threads()
    if Path(directory).suffix == ".gguf":
        return measure_llama_cpp(Path(directory), threads, repeats)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    loaded = load_for_inference(directory, threads=threads)
    load_s = time.perf_counter() - start
    model, tok = loaded.model, loaded.tokenizer
    # a prompt of real code, repeated to 512 tokens
    base = tok(PROMPT * 64, add_special_tokens=False, return_tensors="pt")["input_ids"]
    long_ids = base[:, :PREFILL_TOKENS]
    short_ids = base[:, :16]
    _generate_seconds(model, short_ids, 4)  # warm up (session allocations, kernels)
    one = statistics.median(_generate_seconds(model, short_ids, 1) for _ in range(repeats))
    full = statistics.median(_generate_seconds(model, short_ids, DECODE_TOKENS + 1) for _ in range(repeats))
    decode_generate = DECODE_TOKENS / max(1e-9, full - one)
    if loaded.kind == "onnx":
        dec = OnnxDecoder(Path(directory), threads)
        run = dec.generate
    else:
        def run(ids, n):
            return torch_decode(model, ids, n)
    short, long = short_ids[0].tolist(), long_ids[0].tolist()
    _lean_seconds(run, short, 4)
    prefill = statistics.median(_lean_seconds(run, long, 1) for _ in range(repeats))
    one = statistics.median(_lean_seconds(run, short, 1) for _ in range(repeats))
    full = statistics.median(_lean_seconds(run, short, DECODE_TOKENS + 1) for _ in range(repeats))
    decode = DECODE_TOKENS / max(1e-9, full - one)
    if loaded.kind == "onnx":
        size = model_bytes(onnx_file(Path(directory)))
    else:
        # parameters and buffers (a BitNet model's packed ternary weights are buffers), shared ones once
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"kind": loaded.kind, "threads": threads, "load_seconds": round(load_s, 3),
            "prefill_512_ms": round(prefill * 1000, 1), "decode_tokens_per_second": round(decode, 2),
            "decode_tokens_per_second_generate": round(decode_generate, 2),
            "peak_rss_bytes": peak_rss_bytes(), "bytes": size}


def measure_all(pytorch_dir: Path, onnx_dirs: dict[str, Path], threads: int | None = None) -> dict:
    results = {}
    for name, d in [("pytorch", pytorch_dir), *onnx_dirs.items()]:
        cmd = [sys.executable, "-m", "qtrain.export.speed", str(d)] + (["--threads", str(threads)] if threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results[name] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("decode_tokens_per_second", "decode_tokens_per_second_generate"):
        base = results.get("pytorch", {}).get(key)
        for r in results.values():
            if base and key in r:
                r[key.replace("decode_tokens_per_second", "decode_speedup_vs_pytorch")] = round(r[key] / base, 3)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("directory")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print(json.dumps(measure(Path(args.directory), args.threads)))


if __name__ == "__main__":
    main()
