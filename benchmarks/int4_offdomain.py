"""int4 (and int8) ONNX exports of the default model on code outside both the training domain and the GPTQ
calibration: perplexity on fixed, named source files of peft, accelerate and fastapi (third-party library code;
qtrain's default training corpus is the standard library, and the "mix" calibration draws its general code from
other packages, qtrain.export.gptq.GENERAL_CODE_PACKAGES). The standard library's validation split is the second
column. Every variant is the exported ONNX file, run through onnxruntime, against PyTorch fp32 on the same rows.

Variants: onnxruntime's own weight-only methods (round-to-nearest, HQQ, k-quant) and qtrain's GPTQ with either
calibration, symmetric or with zero points, and three block sizes. All 4-bit variants keep the LM head at 8 bits
and int8 activations per block (accuracy level 4), the export's defaults.
Writes benchmarks/results/int4_offdomain.{json,md}.

    python benchmarks/int4_offdomain.py [--tokens-per-file 1024] [--only gptq-mix,rtn]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from common import RESULTS, header, write_results  # noqa: E402 - benchmarks/common.py, beside this script

# (package, path inside it): fixed held-out files, none in the training corpus or the calibration packages
HELDOUT_FILES = [
    ("peft", "tuners/lora/layer.py"),
    ("peft", "peft_model.py"),
    ("peft", "tuners/tuners_utils.py"),
    ("accelerate", "accelerator.py"),
    ("accelerate", "utils/modeling.py"),
    ("accelerate", "big_modeling.py"),
    ("fastapi", "routing.py"),
    ("fastapi", "dependencies/utils.py"),
]
# label: (bits, method, calibration, symmetric, block)
VARIANTS = {
    "int8 (default)": (8, "rtn", None, True, 32),
    "int4 round-to-nearest (onnxruntime)": (4, "rtn", None, True, 32),
    "int4 HQQ (onnxruntime)": (4, "hqq", None, False, 32),
    "int4 k-quant (onnxruntime)": (4, "kquant", None, False, 32),
    "int4 GPTQ, training-split calibration": (4, "gptq", "train", True, 32),
    "int4 GPTQ, mixed calibration": (4, "gptq", "mix", True, 32),
    "int4 GPTQ, mixed calibration, zero points": (4, "gptq", "mix", False, 32),
    "int4 GPTQ, mixed calibration, block 16": (4, "gptq", "mix", True, 16),
    "int4 GPTQ, mixed calibration, block 64": (4, "gptq", "mix", True, 64),
}
SEQ = 512


def heldout_rows(tok, tokens_per_file: int):
    import torch

    rows, files = [], []
    for package, rel in HELDOUT_FILES:
        root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        text = (root / rel).read_text(encoding="utf-8")
        ids = tok(text, add_special_tokens=False)["input_ids"][:tokens_per_file]
        files.append({"file": f"{package}/{rel}", "tokens": len(ids)})
        rows += [ids[i:i + SEQ] for i in range(0, len(ids) - SEQ + 1, SEQ)]
    return torch.tensor(rows), files


def perplexity(model, rows) -> float:
    import torch

    nll = n = 0.0
    with torch.no_grad():
        for i in range(len(rows)):
            ids = rows[i:i + 1]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens-per-file", type=int, default=1024)
    ap.add_argument("--only", help="comma-separated substrings of variant labels to run")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        result = json.loads((RESULTS / "int4_offdomain.json").read_text())
        write_results("int4_offdomain", result, render(result))
        return

    from qtrain.export.gptq import GENERAL_CODE_PACKAGES, apply_gptq, calibration_sequences, general_code_files
    from qtrain.export.onnx import export_fp32, heldout_sequences, merged_model, quantize, untie_lm_head
    from qtrain.export.runtime import OnnxForCausalLM
    from qtrain.export.speed import model_bytes

    assert not {p for p, _ in HELDOUT_FILES} & set(GENERAL_CODE_PACKAGES)
    result = header("int4_offdomain", tokens_per_file=args.tokens_per_file, seq_len=SEQ,
                    calibration_packages=list(GENERAL_CODE_PACKAGES),
                    calibration_files=len(general_code_files()),
                    reproduce="python benchmarks/int4_offdomain.py")
    model, tok, _ = merged_model(None)
    model.eval()
    untie_lm_head(model)
    third, files = heldout_rows(tok, args.tokens_per_file)
    stdlib = heldout_sequences(tok, None, 2048)
    result["heldout_files"] = files
    result["positions"] = {"third_party": int(third.numel() - len(third)), "stdlib": int(stdlib.numel() - len(stdlib))}
    result["pytorch_fp32"] = {"third_party": round(perplexity(model, third), 4),
                              "stdlib": round(perplexity(model, stdlib), 4)}
    print("pytorch fp32", result["pytorch_fp32"], flush=True)
    work = Path(tempfile.mkdtemp(prefix="qtrain-int4-offdomain-"))
    calib = {}
    rows = []
    try:
        export_fp32(model, work / "fp32")
        for label, (bits, method, calibration, symmetric, block) in VARIANTS.items():
            if args.only and not any(s in label for s in args.only.split(",")):
                continue
            start = time.perf_counter()
            out = work / f"v{len(rows)}"
            quantize(work / "fp32", out, bits, block, 4, True, head_bits=8 if bits == 4 else None,
                     symmetric=symmetric, algorithm=method)
            extra = {}
            if method == "gptq":
                if calibration not in calib:
                    calib[calibration] = calibration_sequences(tok, None, 64, calibration=calibration)
                extra = apply_gptq(work / "fp32" / "model.onnx", out / "model.onnx", model, calib[calibration], block)
            ort = OnnxForCausalLM.from_pretrained(out)
            row = {"label": label, "bits": bits, "method": method, "calibration": calibration, "symmetric": symmetric,
                   "block": block, "bytes": model_bytes(out / "model.onnx"),
                   "third_party": round(perplexity(ort, third), 4), "stdlib": round(perplexity(ort, stdlib), 4),
                   "gptq_output_error_vs_rtn": extra.get("output_error_vs_rtn"),
                   "seconds": round(time.perf_counter() - start, 1)}
            for k in ("third_party", "stdlib"):
                row[f"{k}_change"] = round(row[k] / result["pytorch_fp32"][k] - 1, 5)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del ort
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["rows"] = rows
    write_results("int4_offdomain", result, render(result))
    print(render(result))


def render(r: dict) -> str:
    m = r["machine"]
    base = r["pytorch_fp32"]
    lines = [
        "# int4 and int8 ONNX exports on code outside the training domain and the calibration",
        "",
        f"Machine: {m.get('cpu', '?')} ({m.get('cores', '?')} cores), torch {m.get('torch')}; git {r['git']}. "
        f"Reproduce: `{r['reproduce']}`. Default model (SmolLM2-135M-Instruct), exported with `torch.onnx.export`, "
        "quantized, run in onnxruntime. Third-party held-out code: the first "
        f"{r['tokens_per_file']} tokens of each of {len(r['heldout_files'])} named files "
        f"({', '.join(f['file'] for f in r['heldout_files'])}), {r['positions']['third_party']:,} positions; "
        f"stdlib: the standard library's validation split, {r['positions']['stdlib']:,} positions. "
        "GPTQ calibration: 64 x 512 tokens, either all from the training split (the standard library) or half of it "
        f"and half from {r['calibration_files']} files of {', '.join(r['calibration_packages'])}. "
        "4-bit rows: LM head 8-bit, accuracy level 4.",
        "",
        f"PyTorch fp32 perplexity: third-party {base['third_party']:.3f}, stdlib {base['stdlib']:.3f}.",
        "",
        "| variant | size (MB) | third-party ppl (change) | stdlib ppl (change) | GPTQ output error vs RTN | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        err = f"{row['gptq_output_error_vs_rtn']:.3f}" if row.get("gptq_output_error_vs_rtn") is not None else "-"
        lines.append(f"| {row['label']} | {row['bytes'] / 1e6:.0f} | {row['third_party']:.3f} "
                     f"({row['third_party_change']:+.1%}) | {row['stdlib']:.3f} ({row['stdlib_change']:+.1%}) | "
                     f"{err} | {row['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
