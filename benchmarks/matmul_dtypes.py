"""Matmul throughput by dtype on this CPU: whether low precision pays here, before a recipe asks for it.

fp32, bf16 and fp16 square matmuls (torch, the process's thread count), median of ``--repeats`` after one
warm-up. Where the CPU has no native bf16 (x86 without AVX512-BF16 or AMX) oneDNN emulates it, and `qtrain fit`
warns about `dtype=bfloat16` (qtrain.train.slow_precision_warning).

    python benchmarks/matmul_dtypes.py            # writes benchmarks/results/matmul_dtypes.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, write_results  # noqa: E402


def gflops(n: int, dtype, repeats: int) -> tuple[float, list[float]]:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (oneDNN builds its kernel for the shape once)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512,1024", help="square matmul sizes")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    from qtrain.measure import cpu_has_native_bf16

    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        row = {"n": n}
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            row[name], row[f"{name}_seconds"] = gflops(n, dtype, args.repeats)
        rows.append(row)
        print(f"n={n}: " + ", ".join(f"{k} {row[k]:.1f}" for k in ("float32", "bfloat16", "float16")) + " GFLOP/s",
              file=sys.stderr)
    native = cpu_has_native_bf16()
    result = header("matmul_dtypes", command="python benchmarks/matmul_dtypes.py"
                    + (f" --sizes {args.sizes}" if args.sizes != "512,1024" else ""),
                    threads=torch.get_num_threads(), native_bf16=native, rows=rows)
    m = result["machine"]
    lines = ["# Matmul throughput by dtype on this CPU", "",
             f"Machine: {m['cpu']} ({m['cores']} cores, {result['threads']} torch threads), torch {m.get('torch')}; "
             f"native bf16 (AVX512-BF16 or AMX): {'yes' if native else 'no' if native is False else 'unknown'}; "
             f"git {result['git']}. Reproduce: `{result['command']}`. Square matmuls, median of {args.repeats}.", "",
             "| n | fp32 GFLOP/s | bf16 GFLOP/s | fp16 GFLOP/s | bf16 / fp32 | fp16 / fp32 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['float32']:.1f} | {r['bfloat16']:.2f} | {r['float16']:.2f} | "
                     f"{r['bfloat16'] / r['float32']:.4f} | {r['float16'] / r['float32']:.4f} |")
    md = "\n".join(lines)
    write_results("matmul_dtypes", result, md)
    print(md)


if __name__ == "__main__":
    main()
