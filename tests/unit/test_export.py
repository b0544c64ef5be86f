"""Export to ONNX (fp32/int8/int4) and GGUF on a tiny random-init Llama: parity, layout, bad input, generate."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from qtrain import cli
from qtrain.export import ExportError
from qtrain.export.onnx import ExportOptions, export_onnx, merged_model
from qtrain.export.runtime import NotAnExportError, OnnxForCausalLM


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, code_dir):
    from qtrain.recipe import load_recipe
    from qtrain.train import fit

    recipe = load_recipe(None, ["seq_len=64", "micro_batch_size=2", "grad_accum_steps=1", "warmup_steps=1",
                                "val_max_sequences=2", "lora_r=4", "lora_alpha=16", "learning_rate=5e-2",
                                "max_steps=3", "method=lora"])
    out = tmp_path_factory.mktemp("runs") / "lora"
    fit(recipe, model=str(tiny_model_dir), data=str(code_dir), output=out)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, lora_run, code_dir):
    out = tmp_path_factory.mktemp("exports") / "onnx"
    opts = ExportOptions(int8=True, int4=True, positions=512, gen_tokens=8, data=str(code_dir), speed=False,
                         min_agreement={"fp32": 0.99, "int8": 0.0, "int4": 0.0})
    report = export_onnx(str(lora_run), out, opts, say=lambda *_: None)
    return out, report


def test_lora_is_merged_exactly(lora_run):
    model, tok, info = merged_model(str(lora_run))
    assert info["adapter"] is True
    assert info["merge_max_abs_logit_diff"] < 1e-4
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_onnx_export_layout_and_parity(exported, code_dir):
    out, report = exported
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["formats"].keys() == {"fp32", "int8", "int4"}
    fp32 = on_disk["formats"]["fp32"]["parity"]
    assert fp32["positions"] >= 500
    assert fp32["next_token_agreement"] >= 0.99
    assert fp32["max_abs_logit_diff"] < 1e-3
    assert abs(fp32["perplexity_rel_change"]) < 1e-3
    assert fp32["greedy_equal"] == fp32["greedy_prompts"]
    for name in ("int8", "int4"):
        p = on_disk["formats"][name]["parity"]
        assert 0.0 <= p["next_token_agreement"] <= 1.0 and p["perplexity"] > 0
    # 8-bit weights stay closer to fp32 than 4-bit ones
    assert on_disk["formats"]["int8"]["parity"]["mean_abs_logit_diff"] < on_disk["formats"]["int4"]["parity"]["mean_abs_logit_diff"]
    assert on_disk["formats"]["int4"]["bytes"] < on_disk["formats"]["int8"]["bytes"] < on_disk["formats"]["fp32"]["bytes"]
    # GPTQ replaced onnxruntime's round-to-nearest in every 4-bit layer, with less output error on calibration text
    g = on_disk["formats"]["int4"]["gptq"]
    assert on_disk["formats"]["int4"]["method"] == "gptq" and g["layers"] == 14 and g["output_error_vs_rtn"] < 1.0
    # the defaults that decode fast on a CPU: int8 activations per block, the (untied) LM head quantized
    assert on_disk["formats"]["int8"]["accuracy_level"] == 4 and on_disk["formats"]["int4"]["lm_head_bits"] == 8
    assert on_disk["formats"]["int8"]["lm_head_quantized"] and on_disk["source"]["lm_head_untied_for_export"]
    # every level loads as a transformers model and carries the tokenizer
    for d in (out, out / "int8", out / "int4"):
        m = OnnxForCausalLM.from_pretrained(d)
        assert (d / "tokenizer.json").is_file() and (d / "config.json").is_file()
        ids = torch.tensor([[1, 2, 3, 4]])
        assert m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape[:2] == (1, 4)
    assert not list(out.parent.glob(".onnx.*"))  # no temporary directory left


def test_export_refuses_existing_output_and_bad_sources(exported, lora_run, tmp_path, code_dir):
    out, _ = exported
    opts = ExportOptions(speed=False, data=str(code_dir))
    with pytest.raises(ExportError, match="already exists.*--overwrite"):
        export_onnx(str(lora_run), out, opts, say=lambda *_: None)
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(str(tmp_path / "nope"), tmp_path / "o", opts, say=lambda *_: None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="holds no model"):
        export_onnx(str(empty), tmp_path / "o", opts, say=lambda *_: None)
    broken = tmp_path / "broken"
    shutil.copytree(lora_run, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ExportError, match="adapter.*could not be read"):
        export_onnx(str(broken), tmp_path / "o", opts, say=lambda *_: None)
    assert not (tmp_path / "o").exists()


def test_optimum_onnx_loads_the_export_where_installed(exported):
    """The export keeps optimum-onnx's names, so its loader reads it too (optimum-onnx needs transformers 4.x)."""
    pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is not installed (it requires transformers<4.58)")
    from optimum.onnxruntime import ORTModelForCausalLM

    out, _ = exported
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    ours = OnnxForCausalLM.from_pretrained(out)
    theirs = ORTModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(theirs(input_ids=ids, attention_mask=torch.ones_like(ids)).logits,
                               ours(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert theirs.generate(input_ids=ids, **kw).tolist() == ours.generate(input_ids=ids, **kw).tolist()


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen2", "mistral", "gpt2", "phi3", "gemma2", "qwen3",
                                    "starcoder2", "falcon"])
def test_export_fp32_matches_pytorch_across_families_lengths_and_padding(family, tmp_path):
    """Traced at one shape, the graph must hold at others: prefill, one-token decode over a cache, a batch of two
    with left padding, through transformers' generate; architectures other than Llama's included."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtrain.export.onnx import export_fp32

    extra = {"n_embd": 32, "n_layer": 2, "n_head": 4} if family == "gpt2" else {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    if family not in ("gpt2", "gpt_neox"):
        extra["num_key_value_heads"] = 2
    if family in ("gemma2", "qwen3"):
        extra["head_dim"] = 8
    cfg = AutoConfig.for_model(family, vocab_size=96, tie_word_embeddings=False, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(_saved(AutoModelForCausalLM.from_config(cfg), tmp_path / "src"),
                                                 dtype=torch.float32).eval()
    info = export_fp32(model, tmp_path / "onnx")
    assert "torch.onnx.export" in info["exporter"]
    ours = OnnxForCausalLM.from_pretrained(tmp_path / "onnx")
    ids = torch.randint(1, 96, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    # positions count real tokens, as generate() gives them (GPT-2's own forward would count the padding too)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    for beams in (1, 2):  # greedy, and beam search (which reorders the cache between steps)
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, num_beams=beams)
        with torch.no_grad():
            assert ours.generate(input_ids=ids, attention_mask=mask, **kw).tolist() == \
                model.generate(input_ids=ids, attention_mask=mask, **kw).tolist(), beams
    # a filled torch cache (here the PyTorch model's own) is read, and extended in place as the model would
    from qtrain.export.onnx import cache_tensors

    with torch.no_grad():
        first = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], position_ids=positions[:, :5], use_cache=True)
    torch_cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
    step = ours(input_ids=ids[:, 5:], attention_mask=mask, position_ids=positions[:, 5:], past_key_values=torch_cache)
    assert torch_cache.get_seq_length() == 9 and cache_tensors(step, 0)[0].shape[2] == 9
    torch.testing.assert_close(step.logits[real[:, 5:]], want[:, 5:][real[:, 5:]], rtol=1e-4, atol=1e-4)


def _saved(model, path):
    model.save_pretrained(path)
    return path


def test_export_refuses_a_directory_without_a_decoder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotAnExportError, match="not an ONNX export"):
        OnnxForCausalLM.from_pretrained(tmp_path)


def test_cli_fails_loudly_below_the_agreement_threshold(lora_run, tmp_path, code_dir, capsys):
    out = tmp_path / "strict"
    args = ["export", str(lora_run), "--onnx", "--int4", "--no-speed", "--data", str(code_dir), "-o", str(out),
            "--min-agreement", "int4=1.0", "--block-size", "16", "--int4-asymmetric"]
    code = cli.main(args)
    report = json.loads((out / "report.json").read_text())
    int4 = report["formats"]["int4"]
    # the asymmetric grid end to end: onnxruntime's zero points decoded, replaced by GPTQ's, and the model loads
    assert int4["symmetric"] is False and int4["gptq"]["layers"] == 14 and int4["gptq"]["output_error_vs_rtn"] < 1.0
    assert int4["parity"]["next_token_agreement"] < 1.0, "4-bit weights should move some argmax"
    assert code == 3 and report["failing"] == ["int4"]
    assert "FAILING" in capsys.readouterr().out
    assert cli.main(args + ["--overwrite", "--allow-degraded"]) == 0


@pytest.mark.parametrize("value", ["1.5", "int9=0.5", "abc"])
def test_min_agreement_is_validated(value, capsys):
    assert cli.main(["export", "--onnx", "--min-agreement", value]) == 2
    assert value in capsys.readouterr().err


def test_block_size_is_validated_before_any_work(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["export", "--onnx", "--int4", "--block-size", "7", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--block-size 7" in err and "16, 32, 64, 128 or 256" in err
    assert not out.exists()


def test_generate_streams_from_run_and_onnx(lora_run, exported, capsys):
    assert cli.main(["generate", str(lora_run), "-p", "def f(x):", "-n", "6", "--no-chat"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def f(x):") and "tokens/s" in captured.err
    out, _ = exported
    assert cli.main(["generate", str(out / "int8"), "-p", "import os", "-n", "4", "--no-chat"]) == 0
    assert "[onnx:" in capsys.readouterr().err


def test_stop_sequences_cut_the_stream(tiny_model_dir):
    from qtrain.infer import load_for_inference, stream_generate

    loaded = load_for_inference(str(tiny_model_dir))
    full = "".join(stream_generate(loaded, "def", max_new_tokens=24))
    assert len(full) > 4
    stop = full[2:4]
    cut = "".join(stream_generate(loaded, "def", max_new_tokens=24, stop=[stop]))
    assert cut == full[: full.find(stop)]


# ------------------------------------------------------------------------------------------------------ GGUF

def test_gguf_round_trip_f32_is_exact_and_q8_0_is_close(lora_run, tmp_path, code_dir):
    from qtrain.export.gguf import export_gguf

    f32 = export_gguf(str(lora_run), tmp_path / "m-f32.gguf", outtype="f32", data=str(code_dir), positions=256,
                      pre_tokenizer="gpt-2")
    v = f32["verify"]
    assert v["tokenizer_equal"] and v["pre_tokenizer_read_back"] == "gpt-2"
    assert v["max_abs_logit_diff"] < 1e-4  # the q/k permutation is undone exactly
    q8 = export_gguf(str(lora_run), tmp_path / "m-q8.gguf", outtype="q8_0", data=str(code_dir), positions=256,
                     pre_tokenizer="gpt-2")
    assert q8["tensor_types"]["Q8_0"] > 0 and q8["bytes"] < f32["bytes"]
    assert q8["verify"]["next_token_agreement"] >= 0.9
    with pytest.raises(ExportError, match="already exists"):
        export_gguf(str(lora_run), tmp_path / "m-q8.gguf")


def test_gguf_q8_0_runs_in_llama_cpp(lora_run, tmp_path, code_dir):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
    from qtrain.export.gguf import export_gguf

    q8 = export_gguf(str(lora_run), tmp_path / "m-q8.gguf", outtype="q8_0", data=str(code_dir), positions=256,
                     pre_tokenizer="gpt-2")
    lc = q8["verify"]["llama_cpp"]
    assert lc["positions"] >= 200 and lc["next_token_agreement"] >= 0.9, lc


def test_gguf_refuses_an_unknown_pre_tokenizer(tiny_model_dir, tmp_path):
    from qtrain.export.gguf import export_gguf

    with pytest.raises(ExportError, match="pre-tokenizer.*--gguf-pre"):
        export_gguf(str(tiny_model_dir), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_lean_decoders_match_generate(exported, lora_run):
    from qtrain.infer import OnnxDecoder, load_for_inference, torch_decode

    out, _ = exported
    prompt = [5, 17, 42, 99, 7]
    ids = torch.tensor([prompt])
    ort_model = OnnxForCausalLM.from_pretrained(out / "int8")
    want = ort_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                              do_sample=False)[0, len(prompt):].tolist()
    assert list(OnnxDecoder(out / "int8").generate(prompt, 12)) == want
    model = load_for_inference(str(lora_run)).model
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False)[0, len(prompt):].tolist()
    assert list(torch_decode(model, prompt, 12)) == want


def test_speed_report_has_every_figure(exported):
    from qtrain.export.speed import measure

    out, _ = exported
    s = measure(out / "int4", threads=1, repeats=1)
    assert s["kind"] == "onnx" and s["bytes"] > 0 and s["peak_rss_bytes"] > 0
    for key in ("load_seconds", "prefill_512_ms", "decode_tokens_per_second", "decode_tokens_per_second_generate"):
        assert s[key] > 0, key


def test_an_onnx_export_can_be_evaluated(exported, tmp_path):
    from qtrain.evaluate import EvalOptions, run_eval

    out, _ = exported
    s = run_eval(str(out / "int8"), EvalOptions(limit=3, max_new_tokens=6, batch_size=2, chat=False), tmp_path / "ev",
                 say=lambda *_: None)
    assert s["problems"] == 3 and s["generation_tokens"] > 0 and s["val_perplexity"] > 1
    assert s["model"].endswith("int8")


def test_gptq_beats_round_to_nearest_on_matmulnbits_grid():
    from qtrain.export.gptq import dequantize, gptq, pack, rtn_grid, unpack

    torch.manual_seed(0)
    w = torch.randn(48, 128)
    # correlated inputs of uneven energy (as real activations are): x = z @ mix
    x = (torch.randn(2000, 128) * torch.linspace(0.2, 3, 128)) @ (torch.eye(128) + 0.5 * torch.randn(128, 128) / 128 ** 0.5)
    h = (x.T @ x).double()

    def err(q):
        return float(((x @ (dequantize(q[0], q[1], 32, q[2]) - w).T) ** 2).mean())

    for symmetric in (True, False):
        rtn = rtn_grid(w, 32, symmetric)
        errs = {}
        for act_order in (False, True):
            q = gptq(w, h, 32, symmetric=symmetric, act_order=act_order)
            for codes, scales, zeros in (q, rtn):
                assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scales.shape == zeros.shape == (48, 4)
                assert torch.equal(torch.from_numpy(unpack(pack(codes.numpy(), 32), 48, 128)), codes)
            errs[act_order] = err(q)
            assert errs[act_order] < 0.9 * err(rtn), (symmetric, act_order, errs, err(rtn))
        # input energy rises left to right here: visiting the strongest inputs first must pay
        assert errs[True] < 0.8 * errs[False], errs
    # the symmetric round-to-nearest grid is MatMulNBits': the largest-magnitude weight of each block is exact
    c, s, z = rtn_grid(w, 32)
    assert torch.equal(z, torch.full_like(z, 8.0))
    d = dequantize(c, s, 32, z).reshape(48, 4, 32)
    g = w.reshape(48, 4, 32)
    big = g.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(torch.gather(d, -1, big), torch.gather(g, -1, big))


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_grid_is_onnxruntimes_bit_for_bit_on_bf16_weights(symmetric):
    # bf16-valued weights (as SmolLM2's) make ties common: |min| == max in a block, and w/scale exactly x.5
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    from qtrain.export.gptq import rtn_grid, unpack

    k, n, block = 256, 96, 32
    w = (torch.randn(k, n, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16().float().numpy()
    w[:block, 0] = np.abs(w[:block, 0])  # a block without negative weights (zero point 0 when asymmetric)
    packed = np.zeros((n, k // block, block // 2), dtype=np.uint8)
    scales = np.zeros(n * (k // block), dtype=np.float32)
    zero_points = np.zeros(n * ((k // block + 1) // 2), dtype=np.uint8)
    quantize_matmul_4bits(packed, w, scales, zero_points, block, n, k, symmetric)
    codes, ours, zeros = rtn_grid(torch.from_numpy(w.T.copy()), block, symmetric)
    assert np.array_equal(ours.numpy(), scales.reshape(n, k // block))
    assert np.array_equal(unpack(packed, n, k), codes.numpy())
    if not symmetric:
        assert np.array_equal(unpack(zero_points.reshape(n, -1), n, k // block), zeros.numpy())
        assert zeros[0, 0] == 0


@pytest.mark.parametrize("bad, words", [({"int4_block_size": 48}, "int4_block_size=48"),
                                        ({"int8_accuracy_level": 7}, "int8_accuracy_level=7"),
                                        ({"int4_method": "awq"}, "gptq, rtn, hqq, kquant"),
                                        ({"min_agreement": {"int4": -0.1}}, "int4=-0.1"),
                                        ({"threads": 0}, "--threads 0")])
def test_export_options_check_themselves(bad, words):
    from qtrain.export.onnx import ExportOptions

    with pytest.raises(ExportError, match=re.escape(words)):
        ExportOptions(**bad)


def test_mixed_calibration_is_half_training_split_half_general_code(tiny_model_dir, code_dir):
    from transformers import AutoTokenizer

    from qtrain.export.gptq import GENERAL_CODE_PACKAGES, calibration_sequences, general_code_files

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    files = general_code_files(per_package=3)
    assert files and all(f.suffix == ".py" for f in files)
    # interleaved: the first files come from different packages
    packages = [next(p for p in GENERAL_CODE_PACKAGES if f"/{p}/" in f.as_posix()) for f in files[:4]]
    assert len(set(packages)) == 4, packages
    train = calibration_sequences(tok, str(code_dir), n=8, seq_len=64, calibration="train")
    mix = calibration_sequences(tok, str(code_dir), n=8, seq_len=64, calibration="mix")
    assert train.shape == mix.shape == (8, 64)
    assert torch.equal(mix[:4], train[:4])  # the first half is the training split, the rest is other code
    assert not any(torch.equal(mix[i], train[j]) for i in range(4, 8) for j in range(8))
    with pytest.raises(ValueError, match="calibration 'web'"):
        calibration_sequences(tok, str(code_dir), calibration="web")


@pytest.mark.parametrize("method", ["hqq"])  # k-quant: onnxruntime's code fails on the tiny model's 16-wide
def test_onnxruntime_int4_methods_export_and_load(exported, tmp_path, method):  # KV projections; the benchmark runs it
    from qtrain.export.onnx import quantize

    out, report = exported
    info = quantize(out, tmp_path / method, 4, 32, 4, True, head_bits=8, symmetric=False, algorithm=method)
    assert info["algorithm"] == method
    model = OnnxForCausalLM.from_pretrained(tmp_path / method)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    fp32 = OnnxForCausalLM.from_pretrained(out)
    a = model(input_ids=ids).logits
    b = fp32(input_ids=ids).logits
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    assert (a - b).abs().mean() < b.abs().mean()  # 4-bit weights move the logits, not beyond recognition


def test_export_options_name_the_int4_choices():
    with pytest.raises(ExportError, match="gptq, rtn, hqq, kquant"):
        ExportOptions(int4_method="awq")
    with pytest.raises(ExportError, match="mix or train"):
        ExportOptions(int4_calibration="web")
