"""``qtrain export --onnx``: merge, export with ``torch.onnx.export``, quantize with onnxruntime, and prove parity.

Layout of the output directory (each level loads with ``qtrain.export.runtime.OnnxForCausalLM.from_pretrained``,
and with optimum-onnx's ``ORTModelForCausalLM`` where that is installed):

    OUT/               fp32 decoder with KV cache (model.onnx), config, generation config, tokenizer
    OUT/int8/          8-bit weight-only MatMulNBits (blockwise scales) -- see ``quantize`` for why not QInt8
    OUT/int4/          4-bit weight-only MatMulNBits
    OUT/report.json    parity (and, with --speed, speed) per format; also printed
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from qtrain.export import ExportError
from qtrain.export.speed import model_bytes
from qtrain.io import atomic_write_json, make_tmp_dir, replace_dir

log = logging.getLogger(__name__)

TASK = "text-generation-with-past"
# Default thresholds on teacher-forced greedy next-token agreement with the PyTorch model. 4-bit weights on a
# 135M model move more argmaxes than 8-bit ones do; both are configurable (--min-agreement).
DEFAULT_MIN_AGREEMENT = {"fp32": 0.99, "int8": 0.95, "int4": 0.80}
PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\ndef list_python_files(root):\n    \"\"\"Return the .py files under root, recursively.\"\"\"\n",
    "class Stack:\n    def __init__(self):\n",
    "def is_prime(n: int) -> bool:\n",
    "# Read a CSV file and print the sum of the second column\nimport csv\n",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n",
]


INT4_METHODS = ("gptq", "rtn", "hqq", "kquant")


@dataclass
class ExportOptions:
    int8: bool = False
    int4: bool = False
    int4_block_size: int = 16  # +9.2% perplexity off-domain vs +16.5% at 32, ~20% slower (int4_offdomain.md)
    int4_accuracy_level: int = 4
    int4_head_bits: int = 8  # the LM head at 8 bits: measured +24% perplexity either way, but 74% vs 71% agreement
    # "gptq" (qtrain/export/gptq.py), or onnxruntime's own: "rtn" (round-to-nearest), "hqq" (half-quadratic,
    # zero points), "kquant" (k-quant search of scales); benchmarks/results/int4_offdomain.md compares them
    int4_method: str = "gptq"
    int4_calibration: str = "mix"  # GPTQ's Hessians: half training split, half general code ("train": all training)
    int4_calibration_sequences: int = 64
    int4_symmetric: bool = True  # False: a 4-bit zero point per block (MatMulNBits' asymmetric form)
    int4_act_order: bool = True  # GPTQ visits the inputs with the most energy first
    int8_block_size: int = 32
    int8_accuracy_level: int = 4  # int8 activations per block: level 0 (fp32) decoded at 11 tok/s here, level 4 at 78
    quantize_lm_head: bool = True
    min_agreement: dict = field(default_factory=lambda: dict(DEFAULT_MIN_AGREEMENT))
    positions: int = 2048
    gen_tokens: int = 32
    data: str | None = None
    speed: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        for name, value in (("int4_block_size", self.int4_block_size), ("int8_block_size", self.int8_block_size)):
            if value not in (16, 32, 64, 128, 256):
                raise ExportError(f"{name}={value}: MatMulNBits takes blocks of 16, 32, 64, 128 or 256")
        for name, value in (("int4_accuracy_level", self.int4_accuracy_level),
                            ("int8_accuracy_level", self.int8_accuracy_level)):
            if value not in (0, 1, 2, 3, 4):
                raise ExportError(f"{name}={value}: use 0 (unset), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8)")
        if self.int4_head_bits not in (4, 8):
            raise ExportError(f"int4_head_bits={self.int4_head_bits}: use 4 or 8")
        if self.int4_method not in INT4_METHODS:
            raise ExportError(f"int4_method={self.int4_method!r}: use one of {', '.join(INT4_METHODS)}")
        if self.int4_calibration not in ("mix", "train"):
            raise ExportError(f"int4_calibration={self.int4_calibration!r}: use mix or train")
        for fmt, value in self.min_agreement.items():
            if not 0.0 <= value <= 1.0:
                raise ExportError(f"min_agreement {fmt}={value}: give a fraction in [0, 1]")
        for name in ("int4_calibration_sequences", "positions", "gen_tokens"):
            if getattr(self, name) < 1:
                raise ExportError(f"{name}={getattr(self, name)} must be positive")
        if self.threads is not None and self.threads < 1:
            raise ExportError(f"--threads {self.threads} must be positive")


# ------------------------------------------------------------------------------------------- the source model

def merged_model(ref):
    """(fp32 model with any adapter merged, tokenizer, info) for a run directory, a model dir/hub id, or None.

    A run is loaded and merged by ``runs.load_merged`` (a QLoRA base in the NF4 form it trained against,
    dequantized, then merged); anything else by ``infer.load_for_inference``.
    """
    import torch

    from qtrain.infer import load_for_inference

    path = Path(ref) if ref is not None else None
    if path is not None and not path.exists() and (str(ref).startswith((".", "/")) or path.parent != Path(".")):
        raise ExportError(f"run directory {str(ref)!r} does not exist; give the --output directory of `qtrain fit`")
    from qtrain.runs import is_run_dir

    if path is not None and path.is_dir() and not is_run_dir(path) and not (path / "config.json").is_file():
        raise ExportError(f"{str(ref)!r} holds no model (no run.json of a qtrain run, no config.json); give the "
                          "--output directory of `qtrain fit` or a Hugging Face model directory")
    if not is_run_dir(path):
        loaded = load_for_inference(ref)
        model = loaded.model if getattr(loaded.model, "is_quantized", False) else loaded.model.float()
        return model, loaded.tokenizer, {"source": loaded.name, "adapter": False}

    from transformers import AutoTokenizer

    from qtrain.models import ModelError, ensure_pad_token
    from qtrain.runs import load_merged

    tok = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tok)
    try:
        model, info = load_merged(path, torch.float32)
    except ModelError as exc:
        raise ExportError(str(exc)) from None
    return model, tok, info


# ------------------------------------------------------------------------------------------------ conversion

def untie_lm_head(model) -> bool:
    """Give the LM head its own copy of the tied embedding matrix; returns whether it was tied.

    Exported tied, the head is ``MatMul(hidden, Transpose(embedding))``: not a constant weight, so onnxruntime's
    quantizer skips it ("MatMul doesn't have const weight") and a quarter of SmolLM2-135M's weights stay fp32
    and are read in full for every generated token. Untied, the head is quantized like every other MatMul.
    """
    import torch

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not emb.weight:
        return False
    head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = []
    return True


def decoder_with_cache(model, layers: int):
    """``model`` (with ``layers`` decoder layers) as a module of flat tensors, the signature an ONNX decoder with KV cache has:
    ``(input_ids, attention_mask, position_ids, past.0.key, past.0.value, ...) -> (logits, present.0.key, ...)``.

    The 2-D padding mask becomes the additive causal 4-D mask here, in plain tensor ops, and goes to the model
    as a custom 4-D mask: transformers' own mask builders use ``vmap`` and data-dependent branches that the
    exporter cannot trace. A custom mask also switches off a sliding window, so a model with one (Mistral)
    exports with full causal attention, the same as its window for sequences shorter than it.
    """
    import inspect

    import torch
    from transformers.cache_utils import DynamicCache

    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    class DecoderWithCache(torch.nn.Module):
        def __init__(self, inner, layers):
            super().__init__()
            self.inner, self.layers = inner, layers

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for i in range(self.layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            seq, total = input_ids.shape[1], attention_mask.shape[1]
            query = torch.arange(seq, device=input_ids.device)[:, None] + (total - seq)
            key = torch.arange(total, device=input_ids.device)[None, :]
            allowed = (key <= query)[None, None] & attention_mask[:, None, None, :].bool()
            dtype = past[0].dtype
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            out = self.inner(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             use_cache=True, **{cache_arg: cache})
            return (out.logits, *[t for i in range(self.layers) for t in cache_tensors(out, i)])

    return DecoderWithCache(model, layers).eval()


def cache_tensors(out, layer: int):
    """(key, value) of one layer of a model output's cache, for transformers 4.5x and 5.x alike."""
    from qtrain.export.runtime import cache_layer, output_cache

    return cache_layer(output_cache(out), layer)


def export_fp32(model, out_dir: Path, opset: int = 17) -> dict:
    """Trace ``model`` (fp32, eager attention) to ``out_dir/model.onnx`` as a decoder with KV cache, with
    optimum-onnx's input and output names, so its ``ORTModelForCausalLM`` loads the file where it is installed.

    ``torch.onnx.export``'s TorchScript tracer, not optimum-onnx (which requires transformers < 4.58, and so would
    hold the package on the 4.x line) and not the dynamo exporter (one more dependency, onnxscript). Traced once at
    past length 3 and 4 new tokens; every length is a dynamic axis, and the export is checked on other lengths and
    batch sizes by the parity step that follows.
    """
    import warnings

    import torch

    if getattr(model.config, "is_encoder_decoder", False):
        raise ExportError(f"{model.config.model_type!r} is an encoder-decoder model; ONNX export here is for "
                          "decoder-only causal LMs")
    previous = getattr(model.config, "_attn_implementation", None)
    _set_attention(model, "eager")  # plain matmul/softmax: every runtime has it; SDPA's kernel choice is traced
    try:
        probe = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            first = model(input_ids=probe, use_cache=True)
        layers = model.config.num_hidden_layers
        past = [t.detach().clone() for i in range(layers) for t in cache_tensors(first, i)]
        wrapper = decoder_with_cache(model, layers)
        ids = torch.tensor([[4, 5, 6, 7]])
        mask = torch.ones(1, 7, dtype=torch.long)
        positions = torch.arange(3, 7)[None]
        kv = [f"{i}.{part}" for i in range(layers) for part in ("key", "value")]
        inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv]
        outputs = ["logits"] + [f"present.{n}" for n in kv]
        axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
                "position_ids": {0: "batch_size", 1: "sequence_length"},
                "logits": {0: "batch_size", 1: "sequence_length"}}
        axes.update({f"past_key_values.{n}": {0: "batch_size", 2: "past_sequence_length"} for n in kv})
        axes.update({f"present.{n}": {0: "batch_size", 2: "total_sequence_length"} for n in kv})
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes fixed at trace time
            torch.onnx.export(wrapper, (ids, mask, positions, *past), str(out_dir / "model.onnx"), dynamo=False,
                              input_names=inputs, output_names=outputs, dynamic_axes=axes, opset_version=opset,
                              do_constant_folding=True)
    finally:
        _set_attention(model, previous)
    model.config.use_cache = True
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    return {"exporter": f"torch.onnx.export (TorchScript), opset {opset}",
            "seconds": round(time.perf_counter() - start, 1)}


def _set_attention(model, name) -> None:
    if name is None:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def quantize(src_dir: Path, dst_dir: Path, bits: int, block_size: int, accuracy_level: int,
             lm_head: bool = True, head_bits: int | None = None, embeddings: bool = False,
             symmetric: bool = True, algorithm: str = "rtn") -> dict:
    """Weight-only blockwise quantization of every MatMul with a constant weight (``MatMulNBits``).

    Why not ``quantize_dynamic`` (QInt8) for int8: measured on this AVX2 CPU (no VNNI) on SmolLM2-135M it was
    no faster than fp32 and kept only 22% of greedy tokens (per-tensor activation scales over a 49k-wide LM head).
    Weight-only 8-bit with one scale per block of ``block_size`` input channels keeps fp32 activations
    (accuracy level 0) or int8 ones per block (level 4), and reads a quarter of the bytes per token.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src = src_dir / "model.onnx"
    model = onnx.load(str(src))
    # the LM head is the MatMul that produces the logits output
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in list(n.output)]
    head_bits = head_bits or bits
    start = time.perf_counter()

    def run(m, nbits, exclude=(), ops=("MatMul",), axes=None, algo=None):
        # nodes_to_include only adds to op_types_to_quantize, so a subset is chosen by excluding the rest
        q = MatMulNBitsQuantizer(m, bits=nbits, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level or None, nodes_to_exclude=list(exclude),
                                 op_types_to_quantize=ops, quant_axes=axes, algo_config=algo)
        q.process()
        return q.model.model

    if lm_head and head and head_bits != bits:
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in head]
        model = run(model, head_bits, exclude=others)
    model = run(model, bits, exclude=() if lm_head and head_bits == bits else head,
                algo=_algorithm_config(algorithm, bits, block_size))
    if embeddings:
        # the embedding table as GatherBlockQuantized (onnxruntime supports 4 bits only for Gather)
        model = run(model, 4, ops=("Gather",), axes=(("Gather", 1),))
    dst_dir.mkdir(parents=True, exist_ok=True)
    big = model.ByteSize() > 1_800_000_000
    onnx.save_model(model, str(dst_dir / "model.onnx"), save_as_external_data=big,
                    location="model.onnx_data" if big else None)
    for f in src_dir.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja") and not f.name.startswith("report"):
            shutil.copy2(f, dst_dir / f.name)
    return {"bits": bits, "block_size": block_size, "accuracy_level": accuracy_level, "symmetric": symmetric,
            "lm_head_quantized": lm_head and bool(head), "lm_head_bits": head_bits if lm_head else 32,
            "embeddings_quantized": embeddings, "algorithm": algorithm,
            "seconds": round(time.perf_counter() - start, 1)}


def _algorithm_config(algorithm: str, bits: int, block_size: int):
    """onnxruntime's weight-only algorithm for ``quantize`` (None: its default round-to-nearest). GPTQ is not one
    of these: it is written over the round-to-nearest blobs afterwards (qtrain/export/gptq.py)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    if algorithm in ("rtn", "gptq"):
        return None
    if algorithm == "hqq":
        return mq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=("MatMul",))
    if algorithm == "kquant":
        return mq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
    raise ExportError(f"int4 method {algorithm!r}: use one of {', '.join(INT4_METHODS)}")


# -------------------------------------------------------------------------------------------------- parity

def heldout_sequences(tokenizer, data: str | None, positions: int, seq_len: int = 256):
    """Held-out code (the validation split of ``data``, default the standard library) as [n, seq_len] ids."""
    import torch

    from qtrain.data.corpus import load_corpus

    _, val_docs, _ = load_corpus(data)
    ids: list[int] = []
    need = positions + seq_len * ((positions + seq_len - 1) // seq_len)  # enough for ceil(positions/seq) rows
    for doc in val_docs:
        ids += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= need:
            break
    rows = max(1, min(len(ids) // seq_len, math.ceil(positions / (seq_len - 1))))
    if len(ids) < seq_len:
        raise ExportError(f"held-out data has {len(ids)} tokens, fewer than {seq_len}; give more code with --data")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()


def _greedy(model, tokenizer, prompts, n):
    import torch

    outs = []
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt", add_special_tokens=False, return_token_type_ids=False)
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                               pad_token_id=tokenizer.pad_token_id)
        outs.append(g[0, enc["input_ids"].shape[1]:].tolist())
    return outs


def reference(model, tokenizer, seqs, opts: ExportOptions) -> dict:
    """The PyTorch model's logits on the held-out rows and greedy tokens on the prompts."""
    return {"logits": [_logits(model, seqs[i:i + 1]) for i in range(len(seqs))],
            "greedy": _greedy(model, tokenizer, PROMPTS, opts.gen_tokens)}


def parity(model, tokenizer, seqs, ref: dict, opts: ExportOptions) -> dict:
    """Compare ``model`` with the reference: logit differences, next-token agreement, perplexity, greedy text."""
    import torch

    max_diff = sum_diff = 0.0
    agree = count = 0
    nll = ref_nll = 0.0
    for i in range(len(seqs)):
        a = ref["logits"][i][0, :-1]
        b = _logits(model, seqs[i:i + 1])[0, :-1]
        y = seqs[i, 1:]
        d = (a - b).abs()
        max_diff = max(max_diff, float(d.max()))
        sum_diff += float(d.mean()) * len(y)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        count += len(y)
        nll += float(torch.nn.functional.cross_entropy(b, y, reduction="sum"))
        ref_nll += float(torch.nn.functional.cross_entropy(a, y, reduction="sum"))
    greedy = _greedy(model, tokenizer, PROMPTS, opts.gen_tokens)
    same = [g == r for g, r in zip(greedy, ref["greedy"])]
    first_diff = []
    for g, r in zip(greedy, ref["greedy"]):
        k = next((j for j, (x, z) in enumerate(zip(g, r)) if x != z), None)
        first_diff.append(k if k is not None else (None if len(g) == len(r) else min(len(g), len(r))))
    ppl, ref_ppl = math.exp(nll / count), math.exp(ref_nll / count)
    return {"positions": count, "max_abs_logit_diff": round(max_diff, 5), "mean_abs_logit_diff": round(sum_diff / count, 6),
            "next_token_agreement": round(agree / count, 5), "perplexity": round(ppl, 4),
            "perplexity_pytorch": round(ref_ppl, 4), "perplexity_rel_change": round(ppl / ref_ppl - 1, 5),
            "greedy_prompts": len(same), "greedy_equal": sum(same), "greedy_first_divergence": first_diff}


# ----------------------------------------------------------------------------------------------- the command

def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not overwrite:
            raise ExportError(f"output {str(output)!r} already exists; choose another -o or pass --overwrite")
        if output.is_dir() and not (output / "report.json").is_file() and not (output / "model.onnx").is_file():
            raise ExportError(f"output {str(output)!r} exists and is not a qtrain export; refusing to replace it "
                              "even with --overwrite. Choose another -o")


def _quant_method(config) -> str | None:
    q = config.quantization_config
    return q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)


def export_onnx(ref, output: str | Path, opts: ExportOptions, overwrite: bool = False, say=print) -> dict:
    """Export ``ref`` to ONNX under ``output``; returns the report (also written to ``output/report.json``)."""
    import torch

    from qtrain.infer import load_onnx

    output = Path(output)
    _check_output(output, overwrite)
    say(f"loading {ref or 'the embedded default model'} ...")
    model, tok, info = merged_model(ref)
    if getattr(model.config, "quantization_config", None) is not None and \
            _quant_method(model.config) == "bitnet":
        raise ExportError("this is a BitNet (ternary) model: its int8 activation quantisation and 2-bit packed "
                          "weights have no faithful ONNX form here; export it with --gguf --outtype tq2_0 "
                          "(llama.cpp's ternary type) instead")
    if info.get("adapter"):
        say(f"merged the LoRA adapter (max |logit difference| merged vs unmerged: {info['merge_max_abs_logit_diff']:.2e})")
    tmp = make_tmp_dir(output)
    try:
        merged_dir = tmp / ".merged"
        info["lm_head_untied_for_export"] = untie_lm_head(model)
        model.save_pretrained(merged_dir, safe_serialization=True)
        tok.save_pretrained(merged_dir)
        say("exporting to ONNX with torch.onnx.export (under a minute for a 135M model on 2 cores) ...")
        formats = {"fp32": {"dir": ".", **export_fp32(model, tmp)}}
        tok.save_pretrained(tmp)
        if opts.int8:
            say(f"quantizing int8 (MatMulNBits 8-bit, block {opts.int8_block_size}) ...")
            formats["int8"] = {"dir": "int8", **quantize(tmp, tmp / "int8", 8, opts.int8_block_size,
                                                         opts.int8_accuracy_level, opts.quantize_lm_head)}
        if opts.int4:
            say(f"quantizing int4 (MatMulNBits 4-bit, block {opts.int4_block_size}, accuracy level "
                f"{opts.int4_accuracy_level}, LM head {opts.int4_head_bits}-bit) ...")
            formats["int4"] = {"dir": "int4", **quantize(tmp, tmp / "int4", 4, opts.int4_block_size,
                                                         opts.int4_accuracy_level, opts.quantize_lm_head,
                                                         head_bits=opts.int4_head_bits,
                                                         symmetric=opts.int4_symmetric,
                                                         algorithm=opts.int4_method)}
            if opts.int4_method == "gptq":
                from qtrain.export.gptq import apply_gptq, calibration_sequences

                what = "training-split code" if opts.int4_calibration == "train" else \
                    "code, half training split and half general"
                say(f"GPTQ for the 4-bit layers ({opts.int4_calibration_sequences} calibration sequences of {what}) ...")
                calib = calibration_sequences(tok, opts.data, opts.int4_calibration_sequences,
                                              calibration=opts.int4_calibration)
                formats["int4"]["gptq"] = apply_gptq(tmp / "model.onnx", tmp / "int4" / "model.onnx", model, calib,
                                                     opts.int4_block_size, act_order=opts.int4_act_order)
                formats["int4"]["gptq"]["calibration"] = opts.int4_calibration
            formats["int4"]["method"] = opts.int4_method
        say(f"checking parity on held-out code ({opts.positions} positions) and {len(PROMPTS)} greedy prompts ...")
        seqs = heldout_sequences(tok, opts.data, opts.positions)
        ref_out = reference(model, tok, seqs, opts)
        failing = []
        for name, f in formats.items():
            d = tmp / f["dir"]
            f["bytes"] = model_bytes(d / "model.onnx")
            ort_model = load_onnx(d, opts.threads)
            f["parity"] = parity(ort_model, tok, seqs, ref_out, opts)
            del ort_model
            need = opts.min_agreement.get(name, 0.0)
            f["min_agreement"] = need
            f["passed"] = f["parity"]["next_token_agreement"] >= need
            if not f["passed"]:
                failing.append(name)
        report = {"source": info, "task": TASK, "formats": formats, "failing": failing,
                  "pytorch_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                  "torch_threads": torch.get_num_threads()}
        del model
        if opts.speed:
            from qtrain.export.speed import measure_all

            say("measuring speed side by side (each runtime in its own process) ...")
            report["speed"] = measure_all(merged_dir, {n: tmp / f["dir"] for n, f in formats.items()},
                                          threads=opts.threads)
        shutil.rmtree(merged_dir)
        atomic_write_json(tmp / "report.json", report)
        replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def render_report(report: dict) -> str:
    lines = ["format  size(MB)  agree   max|dlogit|  ppl (rel)            greedy  status"]
    for name, f in report["formats"].items():
        p = f["parity"]
        lines.append(f"{name:6s}  {f['bytes'] / 1e6:8.1f}  {p['next_token_agreement']:.2%}  {p['max_abs_logit_diff']:11.4f}  "
                     f"{p['perplexity']:.3f} ({p['perplexity_rel_change']:+.2%})  {p['greedy_equal']}/{p['greedy_prompts']}    "
                     f"{'ok' if f['passed'] else 'FAILING (agreement < ' + format(f['min_agreement'], '.0%') + ')'}")
    if "speed" in report:
        lines.append("")
        lines.append("runtime   load(s)  prefill512(ms)  decode tok/s  vs pytorch  via generate()  peak RSS(GiB)")
        base = report["speed"].get("pytorch", {}).get("decode_tokens_per_second")
        for name, s in report["speed"].items():
            if "error" in s:
                lines.append(f"{name:8s}  failed: {s['error'][:100]}")
                continue
            ratio = f"{s['decode_tokens_per_second'] / base:.2f}x" if base else "-"
            lines.append(f"{name:8s}  {s['load_seconds']:7.2f}  {s['prefill_512_ms']:14.1f}  {s['decode_tokens_per_second']:12.1f}  "
                         f"{ratio:>10s}  {s['decode_tokens_per_second_generate']:14.1f}  {s['peak_rss_bytes'] / 2**30:13.2f}")
    return "\n".join(lines)
