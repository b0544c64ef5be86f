"""PyTorch fp32 vs ONNX fp32 / int8 / int4 (and GGUF q8_0 where llama-cpp-python is installed), side by side.

A short LoRA run on the default model and corpus, then ``qtrain export --onnx --int8 --int4`` with its parity
and speed reports (each runtime measured in its own process, one after the other, same prompt and threads).
Writes benchmarks/results/export_speed.{json,md}.

    python benchmarks/export_speed.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import header  # noqa: E402 - benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="LoRA steps before exporting")
    ap.add_argument("--keep", help="keep the run and export here instead of a temporary directory")
    ap.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the saved JSON")
    args = ap.parse_args()
    if args.render_only:
        render(json.loads((RESULTS / "export_speed.json").read_text()))
        return

    from qtrain.export.gguf import export_gguf
    from qtrain.export.onnx import ExportOptions, export_onnx, render_report
    from qtrain.io import atomic_write_json
    from qtrain.recipe import load_recipe
    from qtrain.train import fit

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qtrain-export-bench-"))
    run = work / "run"
    recipe = load_recipe(ROOT / "recipes" / "cpu-lora.yaml", [f"max_steps={args.steps}", "save_every=0",
                                                              "warmup_steps=1", "val_max_sequences=4"])
    t = time.perf_counter()
    fit(recipe, output=run, overwrite=True)
    fit_s = time.perf_counter() - t
    opts = ExportOptions(int8=True, int4=True)
    t = time.perf_counter()
    report = export_onnx(str(run), work / "onnx", opts, overwrite=True)
    export_s = time.perf_counter() - t
    g = export_gguf(str(run), work / "model-q8_0.gguf", outtype="q8_0", overwrite=True)
    gguf = {"bytes": g["bytes"], "verify": g["verify"], "pre_tokenizer": g["pre_tokenizer"]}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        gguf["note"] = ("llama-cpp-python is not installed here (building it compiles llama.cpp, ~10 min); the GGUF "
                        "q8_0 file was written and verified with transformers' GGUF loader, but not timed")
    else:  # llama.cpp's own speed, in its own process like the others, same prompt and threads
        threads = report["speed"]["pytorch"].get("threads", 2)
        proc = subprocess.run([sys.executable, "-m", "qtrain.export.speed", str(work / "model-q8_0.gguf"),
                               "--threads", str(threads)], capture_output=True, text=True, cwd=ROOT)
        gguf["speed"] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                         {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
        gguf["note"] = (f"llama.cpp via llama-cpp-python {llama_cpp.__version__} (built here from source), the "
                        "same lean greedy loop (eval one token, argmax)")
    result = header("export_speed", lora_steps=args.steps, fit_seconds=round(fit_s, 1), export_seconds=round(export_s, 1), report=report, gguf_q8_0=gguf, command=f"python benchmarks/export_speed.py --steps {args.steps}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "export_speed.json", result)
    print(render_report(report))
    render(result)
    print(json.dumps({"work": str(work)}), file=sys.stderr)


def render(result: dict) -> None:
    from qtrain.io import atomic_write_text

    report, gguf, git = result["report"], result["gguf_q8_0"], result["git"]
    m = result["machine"]
    speed = report["speed"]
    base = speed["pytorch"]["decode_tokens_per_second"]
    lines = [f"# Export: PyTorch fp32 vs ONNX (default model after {result['lora_steps']} LoRA steps)", "",
             f"Machine: {m.get('cpu')} ({m.get('cores')} cores), torch {m.get('torch')}; git {git}. "
             f"Reproduce: `{result['command']}`. Decode: greedy, batch 1, 64 new tokens after a 16-token prompt "
             "(time of 65 tokens minus time of 1), the same lean loop for every runtime (model call with KV cache + "
             "argmax; what `qtrain generate` runs); the `generate()` column goes through transformers' generate "
             "(qtrain.export.runtime.OnnxForCausalLM for ONNX). Prefill: one 512-token prompt; median of 3; each runtime in its own "
             "process. Parity: teacher-forced on held-out standard-library code; greedy text on 6 fixed prompts.", "",
             "| format | size (MB) | decode tok/s | vs PyTorch | via generate() (vs PyTorch) | prefill 512 (ms) | load (s) | "
             "peak RSS (GiB) | next-token agreement | perplexity (change) | greedy equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    p0 = next(iter(report["formats"].values()))["parity"]
    s = speed["pytorch"]
    lines.append(f"| PyTorch fp32 | {s['bytes'] / 1e6:.0f} | {s['decode_tokens_per_second']:.1f} | 1.00x | "
                 f"{s['decode_tokens_per_second_generate']:.1f} (1.00x) | {s['prefill_512_ms']:.0f} | {s['load_seconds']:.2f} | {s['peak_rss_bytes'] / 2**30:.2f} | - | "
                 f"{p0['perplexity_pytorch']:.3f} | - |")
    for name, f in report["formats"].items():
        s, p = speed[name], f["parity"]
        if "error" in s:
            lines.append(f"| ONNX {name} | failed: {s['error'][:80]} ||||||||||")
            continue
        lines.append(f"| ONNX {name} | {f['bytes'] / 1e6:.0f} | {s['decode_tokens_per_second']:.1f} | "
                     f"{s['decode_tokens_per_second'] / base:.2f}x | {s['decode_tokens_per_second_generate']:.1f} "
                     f"({s['decode_speedup_vs_pytorch_generate']:.2f}x) | {s['prefill_512_ms']:.0f} | {s['load_seconds']:.2f} | "
                     f"{s['peak_rss_bytes'] / 2**30:.2f} | {p['next_token_agreement']:.2%} | {p['perplexity']:.3f} "
                     f"({p['perplexity_rel_change']:+.2%}) | {p['greedy_equal']}/{p['greedy_prompts']} |")
    v = gguf["verify"]
    gs = gguf.get("speed") or {}
    lc = v.get("llama_cpp") if isinstance(v.get("llama_cpp"), dict) else None
    agree = (f"{lc['next_token_agreement']:.2%} (llama.cpp), {v['next_token_agreement']:.2%} (read back by transformers)"
             if lc else f"{v['next_token_agreement']:.2%} (read back by transformers)")
    timing = (f"{gs['decode_tokens_per_second']:.1f} | {gs['decode_tokens_per_second'] / base:.2f}x | - | "
              f"{gs['prefill_512_ms']:.0f} | {gs['load_seconds']:.2f} | {gs['peak_rss_bytes'] / 2**30:.2f}"
              if "decode_tokens_per_second" in gs else "not timed | - | - | - | - | -")
    lines.append(f"| GGUF q8_0 ({'llama.cpp' if gs else 'not run'}) | {gguf['bytes'] / 1e6:.0f} | {timing} | {agree} | "
                 f"{v['perplexity']:.3f} ({v['perplexity'] / v['perplexity_pytorch'] - 1:+.2%}, transformers read-back, "
                 f"{v['positions']} positions) | - |")
    lines += ["", f"int8 = MatMulNBits 8-bit, block {report['formats']['int8']['block_size']}, accuracy level "
              f"{report['formats']['int8']['accuracy_level']}; int4 = MatMulNBits 4-bit, block "
              f"{report['formats']['int4']['block_size']}, accuracy level {report['formats']['int4']['accuracy_level']}; "
              f"LM head quantized: {report['formats']['int4']['lm_head_quantized']}; int4 rounding: "
              f"{report['formats']['int4'].get('method', 'rtn')}"
              + (f" (output error {report['formats']['int4']['gptq']['output_error_vs_rtn']:.2f}x round-to-nearest's on "
                 f"{report['formats']['int4']['gptq']['calibration_tokens']:,} calibration tokens of "
                 + ("training-split code)" if report['formats']['int4']['gptq'].get('calibration', 'train') == 'train'
                    else "code, half training split and half general library code)")
                 if report['formats']['int4'].get('gptq') else "") + f". GGUF: {gguf.get('note', '')}."]
    atomic_write_text(RESULTS / "export_speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
