"""``qtrain export --gguf``: write a GGUF file for llama.cpp with the ``gguf`` package, and read it back.

Why our own writer: llama.cpp's converter (``convert_hf_to_gguf.py``) is a script in the llama.cpp repository,
not part of the ``gguf`` package on PyPI. This follows it for the Llama family: the same tensor names
(``gguf.get_tensor_name_map``), the rotary permutation of q/k rows, the GPT-2 BPE vocabulary with token types
and merges, and the pre-tokenizer identified the way llama.cpp does it (the hash of a fixed text's token ids).

Verification: the file is read back with transformers' GGUF loader (which undoes the permutation and
dequantizes) and its tokenizer and logits are compared with the source model; with llama-cpp-python installed,
llama.cpp's own logits are compared too.
"""

from __future__ import annotations

import math
import os
import time
from hashlib import sha256
from pathlib import Path

from qtrain.export import ExportError

# llama.cpp's probe text and the pre-tokenizers it names by the sha256 of str(token ids) (from
# convert_hf_to_gguf.py, get_vocab_base_pre); the ones of models qtrain ships configs for.
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
          "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
          "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
          "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
}
SUPPORTED = ("llama", "mistral")  # llama.cpp's LLAMA architecture, same tensor layout
OUTTYPES = ("f32", "f16", "q8_0", "tq2_0", "tq1_0")
# ternary types: BitNet runs only. llama.cpp's TQ2_0 (2.06 bits/weight) and TQ1_0 (1.69) hold blocks of 256
# ternary values with one fp16 scale; rows whose width is not a multiple of 256 go to Q8_0, which holds
# ternary x scale exactly too (its per-32 fp16 scale is then the tensor's scale, quants +-127 or 0).
TERNARY_OUTTYPES = ("tq2_0", "tq1_0")


def pre_tokenizer_name(tokenizer) -> tuple[str | None, str]:
    """(llama.cpp pre-tokenizer name or None, the hash) for a Hugging Face tokenizer."""
    digest = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    return KNOWN_PRE.get(digest), digest


def permute_rotary(w, n_head: int):
    """Reorder q/k rows from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(tokenizer, vocab_size: int):
    import json

    import gguf

    inv = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        t = inv.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            special = decoder[i].special if i in decoder else False
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')!r}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _check_output(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise ExportError(f"GGUF output {str(out)!r} must end in .gguf")
    if out.exists() and not overwrite:
        raise ExportError(f"{str(out)!r} already exists; choose another --gguf-output or pass --overwrite")
    if out.is_dir():
        raise ExportError(f"{str(out)!r} is a directory; give a file name ending in .gguf")


def write_gguf(model, tokenizer, out: Path, outtype: str = "q8_0", name: str = "qtrain",
               pre_tokenizer: str | None = None, ternary: set[str] | None = None) -> dict:
    """Write ``model`` (a Llama-family causal LM in fp32) and its tokenizer to ``out`` (atomically).

    ``ternary``: state-dict names of weights that hold ternary x per-tensor scale (a BitNet model's
    dequantized layers), written as TQ2_0/TQ1_0 for ``outtype`` tq2_0/tq1_0; the other tensors as q8_0 would be.
    """
    import gguf
    import numpy as np
    import torch

    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise ExportError(f"GGUF export supports {', '.join(SUPPORTED)} models; this one is {cfg.model_type!r}. "
                          "Use --onnx, or llama.cpp's convert_hf_to_gguf.py on the merged model")
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if (outtype in TERNARY_OUTTYPES) != bool(ternary):
        raise ExportError(f"--outtype {outtype} is for BitNet (ternary) runs only; use f32, f16 or q8_0 for this model"
                          if outtype in TERNARY_OUTTYPES else
                          f"this is a BitNet (ternary) model: use --outtype tq2_0 or tq1_0 (got {outtype})")
    ternary = ternary or set()
    pre, digest = pre_tokenizer_name(tokenizer)
    if pre_tokenizer:
        pre = pre_tokenizer  # the user knows better (a tokenizer llama.cpp knows under another hash)
    elif pre is None:
        raise ExportError(f"llama.cpp would not recognise this tokenizer's pre-tokenizer (hash {digest[:16]}...; "
                          f"known here: {', '.join(sorted(set(KNOWN_PRE.values())))}); if you know which one it "
                          "is, name it with --gguf-pre NAME")
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
             "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0}[outtype]

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_name(name)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(ftype)
        tokens, types, merges = _vocab(tokenizer, cfg.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for kind in ("bos", "eos", "unk", "pad"):
            tid = getattr(tokenizer, f"{kind}_token_id", None)
            if tid is not None:
                getattr(writer, f"add_{kind}_token_id")(int(tid))
        writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
        if getattr(tokenizer, "chat_template", None):
            writer.add_chat_template(tokenizer.chat_template)

        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        counts: dict[str, int] = {}
        for hf_name, t in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp uses token_embd for the output when there is no output tensor
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise ExportError(f"no GGUF name for tensor {hf_name!r}; this model's layout is not supported")
            data = t.detach().to(torch.float32).numpy()
            if hf_name.endswith("q_proj.weight"):
                data = permute_rotary(data, n_head)
            elif hf_name.endswith("k_proj.weight"):
                data = permute_rotary(data, n_kv)
            qtype = gguf.GGMLQuantizationType.F32
            if data.ndim >= 2 and outtype == "f16":
                qtype = gguf.GGMLQuantizationType.F16
            elif data.ndim >= 2 and hf_name in ternary and data.shape[-1] % 256 == 0:
                qtype = gguf.GGMLQuantizationType[outtype.upper()]
            elif data.ndim >= 2 and outtype != "f32":
                # Q8_0 needs rows in blocks of 32; llama.cpp's converter falls back to F16 otherwise
                qtype = gguf.GGMLQuantizationType.Q8_0 if data.shape[-1] % 32 == 0 else gguf.GGMLQuantizationType.F16
            if qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(new, data.astype(np.float16))
            elif qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.TQ2_0,
                           gguf.GGMLQuantizationType.TQ1_0):
                writer.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)  # uint8 rows of blocks
            else:
                writer.add_tensor(new, np.ascontiguousarray(data))
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"pre_tokenizer": pre, "pre_tokenizer_hash": digest, "tensor_types": counts, "bytes": out.stat().st_size}


def verify(out: Path, model, tokenizer, seqs) -> dict:
    """Read ``out`` back: metadata with gguf's reader, tokenizer and logits with transformers' GGUF loader."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = gguf.GGUFReader(str(out))
    field = reader.fields["tokenizer.ggml.pre"]
    pre = bytes(field.parts[field.data[0]]).decode()
    back = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
    tok_back = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    sample = [tokenizer.decode(s) for s in seqs[:4]] + [CHKTXT]
    tok_equal = all(tok_back(t, add_special_tokens=False)["input_ids"] == tokenizer(t, add_special_tokens=False)["input_ids"]
                    for t in sample)
    max_diff, agree, count, nll, ref_nll = 0.0, 0, 0, 0.0, 0.0
    with torch.no_grad():
        for i in range(len(seqs)):
            ids = seqs[i:i + 1]
            a = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            b = back(input_ids=ids, use_cache=False).logits[0, :-1].float()
            y = ids[0, 1:]
            max_diff = max(max_diff, float((a - b).abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            count += len(y)
            nll += float(torch.nn.functional.cross_entropy(b, y, reduction="sum"))
            ref_nll += float(torch.nn.functional.cross_entropy(a, y, reduction="sum"))
    result = {"runtime": "transformers GGUF loader (dequantized)", "pre_tokenizer_read_back": pre,
              "tokenizer_equal": tok_equal, "positions": count, "max_abs_logit_diff": round(max_diff, 5),
              "next_token_agreement": round(agree / count, 5), "perplexity": round(math.exp(nll / count), 4),
              "perplexity_pytorch": round(math.exp(ref_nll / count), 4)}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        result["llama_cpp"] = "llama-cpp-python not installed: llama.cpp's own logits not compared"
    else:
        result["llama_cpp"] = _llama_cpp_agreement(out, model, seqs)
    return result


def _llama_cpp_agreement(out: Path, model, seqs) -> dict:
    """Teacher-forced next-token agreement of llama.cpp's own logits with the PyTorch model."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    llm = Llama(model_path=str(out), logits_all=True, n_ctx=seqs.shape[1] + 8, verbose=False)
    agree = count = 0
    for i in range(len(seqs)):
        ids = seqs[i].tolist()
        llm.reset()
        llm.eval(ids)
        b = np.array(llm.scores[: len(ids)])[:-1]
        with torch.no_grad():
            a = model(input_ids=seqs[i:i + 1], use_cache=False).logits[0, :-1].numpy()
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        count += len(ids) - 1
    return {"next_token_agreement": round(agree / count, 5), "positions": count}


def ternary_weights_check(out: Path, model, names: set[str]) -> dict:
    """Read the ternary tensors back from ``out`` and compare them with what was written (ternary x scale):
    the largest relative difference (fp16 rounding of the block scale: <= 2**-11) and whether the ternary
    pattern (sign and zeros) is identical."""
    import gguf
    import numpy as np
    import torch

    cfg = model.config
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    reader = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    sd = model.state_dict()
    worst, same, types = 0.0, True, {}
    for hf_name in sorted(names):
        want = sd[hf_name].detach().to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            want = permute_rotary(want, n_head)
        elif hf_name.endswith("k_proj.weight"):
            want = permute_rotary(want, n_kv)
        t = reader[tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))]
        got = gguf.dequantize(t.data, t.tensor_type).reshape(want.shape)
        scale = float(np.abs(want).max()) or 1.0
        worst = max(worst, float(np.abs(got - want).max()) / scale)
        same &= bool(np.array_equal(np.sign(got), np.sign(want)))
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"ternary_tensors": len(names), "types": types, "max_relative_error": worst, "ternary_pattern_equal": same}


def export_gguf(ref, out: str | Path, outtype: str | None = None, overwrite: bool = False, data: str | None = None,
                positions: int = 1024, pre_tokenizer: str | None = None) -> dict:
    """Write ``ref`` (run directory, model) as GGUF and verify it by reading it back. ``outtype`` None: q8_0, or
    tq2_0 for a BitNet run."""
    import copy

    from qtrain.bitnet import dequantized
    from qtrain.export.onnx import heldout_sequences, merged_model

    out = Path(out)
    _check_output(out, overwrite)
    model, tok, info = merged_model(ref)
    reference, ternary = model, None
    if any(type(m).__name__ == "BitLinear" for m in model.modules()):
        # GGUF holds the weights (ternary x scale); llama.cpp quantises activations itself (8-bit per block)
        try:
            model, ternary = dequantized(copy.deepcopy(model))
        except ValueError as exc:
            raise ExportError(str(exc)) from None
    outtype = outtype or ("tq2_0" if ternary else "q8_0")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    written = write_gguf(model, tok, out, outtype, pre_tokenizer=pre_tokenizer, ternary=ternary)
    written["seconds"] = round(time.perf_counter() - start, 1)
    seqs = heldout_sequences(tok, data, positions)
    check = verify(out, reference, tok, seqs)
    if ternary:
        check["ternary_weights"] = ternary_weights_check(out, model, ternary)
        check["reference"] = "the BitNet model in PyTorch (transformers' BitLinear: ternary weights, int8 activations)"
    report = {"file": str(out), "outtype": outtype, "source": info, **written, "verify": check}
    report["summary"] = (f"wrote {out} ({written['bytes'] / 1e6:.1f} MB, {outtype}, pre-tokenizer {written['pre_tokenizer']!r}); "
                         f"read back: tokenizer {'identical' if check['tokenizer_equal'] else 'DIFFERENT'}, next-token "
                         f"agreement {check['next_token_agreement']:.2%} over {check['positions']} positions, "
                         f"max |logit diff| {check['max_abs_logit_diff']:.4f}")
    if ternary:
        tw = check["ternary_weights"]
        report["summary"] += (f"; ternary weights read back {tw['types']}: pattern "
                              f"{'identical' if tw['ternary_pattern_equal'] else 'DIFFERENT'}, max relative error "
                              f"{tw['max_relative_error']:.1e}")
    from qtrain.io import atomic_write_json

    atomic_write_json(out.with_suffix(".report.json"), {k: v for k, v in report.items() if k != "summary"})
    return report
