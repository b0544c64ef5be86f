"""BitNet b1.58: the layer against transformers' pieces, the warmup, training/resume, the packed round trip, GGUF."""

import json

import pytest
import torch
from torch import nn

from qtrain import bitnet
from qtrain.recipe import load_recipe
from qtrain.train import Progress, fit

TINY = ["seq_len=64", "micro_batch_size=2", "grad_accum_steps=2", "warmup_steps=1", "val_max_sequences=4",
        "learning_rate=1e-3", "method=bitnet"]


@pytest.fixture
def eager_transformers_bitnet():
    """transformers' BitNet quantisers are torch.compile'd (~20 s per shape on a CPU); same ops run eagerly."""
    bitnet._eager_bitlinear()


@pytest.mark.parametrize("shape,bias", [((3, 5, 64), False), ((2, 48), True)])
def test_layer_matches_transformers_autobitlinear_forward_and_backward(shape, bias, eager_transformers_bitnet):
    from transformers.integrations.bitnet import AutoBitLinear

    torch.manual_seed(0)
    ref = AutoBitLinear(shape[-1], 36, bias=bias, online_quant=True)
    ours = bitnet.BitNetLinear.from_linear(nn.Linear(shape[-1], 36, bias=bias))
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
        if bias:
            ours.bias.copy_(ref.bias)
    x = torch.randn(*shape) * 3
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), ours(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)  # straight-through to the input
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)  # and to the shadow weights


def test_strength_zero_is_the_original_layer_and_one_is_ternary():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    layer = bitnet.BitNetLinear.from_linear(lin)
    x = torch.randn(4, 32)
    layer.lam = 0.0
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=0)
    layer.lam = 1.0
    t, scale = bitnet.ternarize(lin.weight)
    assert set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert float(scale) == pytest.approx(1 / float(lin.weight.detach().abs().mean()), rel=1e-6)
    xq = bitnet.quantize_activations(x)
    torch.testing.assert_close(layer(x), nn.functional.linear(xq, t / scale, lin.bias))
    y1 = layer(x)
    layer.lam = 0.5  # the warmup's blend is neither
    mid = layer(x)
    assert float((mid - lin(x)).abs().max()) > 1e-4 and float((mid - y1).abs().max()) > 1e-4  # noqa


def test_strength_schedule():
    assert [bitnet.strength_at(s, 0, 10) for s in (0, 5)] == [1.0, 1.0]  # off: ternary from the start
    assert [bitnet.strength_at(s, 4, 100) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    # warmup longer than half the run is capped so the second half trains the true ternary model
    assert bitnet.strength_at(5, 100, 10) == 1.0 and bitnet.strength_at(2, 100, 10) == pytest.approx(0.4)


def test_convert_keeps_the_head_and_rows_that_cannot_be_packed():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=62, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    m = LlamaForCausalLM(cfg)
    converted, kept = bitnet.convert(m)
    assert "lm_head" not in converted and isinstance(m.lm_head, nn.Linear) and not isinstance(m.lm_head, bitnet.BitNetLinear)
    # q k v o and down (32 rows); gate/up have 62 rows, which 4-per-byte packing cannot hold -> kept
    assert sorted(c.rsplit(".", 1)[-1] for c in converted) == ["down_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert any("gate_proj" in k and "62" in k for k in kept)
    assert bitnet.kept_reasons(m) == kept  # what save_packed records, read back from the converted model
    with pytest.raises(ValueError, match="no nn.Linear"):
        bitnet.convert(nn.Sequential(nn.Embedding(4, 4)))


def test_packed_round_trip_matches_the_training_forward(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.bitnet import BitLinear, unpack_weights

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    bitnet.convert(m)
    with torch.no_grad():  # move the shadow weights off their init so the ternary pattern is not trivial
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    m.eval()
    ids = torch.randint(0, m.config.vocab_size, (2, 40))
    with torch.no_grad():
        want = m(input_ids=ids).logits
    bitnet.save_packed(m, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "packed", False, 1e-6)
    sd = load_file(str(tmp_path / "packed" / "model.safetensors"))
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.uint8 and q.shape == (32 // 4, 32)
    cfg = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitnet"
    assert "1 / mean(|W|)" in cfg["qtrain_bitnet"]["scale_convention"]
    assert cfg["qtrain_bitnet"]["kept_reasons"] == []  # every layer but the head packs (64-row MLP)

    back = bitnet.load_packed(tmp_path / "packed")
    layer = back.model.layers[0].self_attn.q_proj
    assert isinstance(layer, BitLinear)
    shadow = m.model.layers[0].self_attn.q_proj.weight
    t, scale = bitnet.ternarize(shadow)
    torch.testing.assert_close(unpack_weights(layer.weight, torch.float32), t, rtol=0, atol=0)  # same ternary values
    torch.testing.assert_close(layer.weight_scale, scale.reshape(1), rtol=0, atol=0)
    # embeddings and norms are stored in bf16: exactly the training model's values rounded to bf16
    emb = sd["model.embed_tokens.weight"]
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, m.model.embed_tokens.weight.detach().bfloat16())
    assert sd["model.norm.weight"].dtype == torch.bfloat16 and layer.weight_scale.dtype == torch.float32
    assert "lm_head.weight" not in sd  # tied to the embeddings: written once
    with torch.no_grad():
        got = back(input_ids=ids).logits
        for p in m.parameters():  # the training forward with those tensors rounded (ternary values unchanged)
            if p.ndim != 2 or p is m.model.embed_tokens.weight:
                p.copy_(p.bfloat16().float())
        rounded = m(input_ids=ids).logits
    torch.testing.assert_close(got, rounded, rtol=1e-4, atol=1e-4)
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())  # the rounding's own effect: small
    # the training model is untouched by saving (its config carries no quantization_config)
    assert getattr(m.config, "quantization_config", None) is None


def test_bitnet_fit_checkpoint_resume_and_load(tmp_path, tiny_model_dir, code_dir, monkeypatch):
    # the GPTQ start runs on the fresh runs; the resumed one loads its checkpoint instead and must still agree
    extra = ["bitnet_warmup_steps=4", "save_every=100", "gradient_checkpointing=true", "bitnet_start=gptq",
             "bitnet_calib_sequences=2"]
    straight = fit(load_recipe(None, TINY + ["max_steps=6", *extra]), model=str(tiny_model_dir),
                   data=str(code_dir), output=tmp_path / "straight")
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [x["bitnet_strength"] for x in lines] == [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]  # warmup capped at 6 // 2
    assert straight["method"] == "bitnet" and straight["trainable_params"] == straight["total_params"]

    original = Progress.update

    def ctrl_c_at_step_2(self, step, info, every):
        original(self, step, info, every)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "update", ctrl_c_at_step_2)
    with pytest.raises(SystemExit):
        fit(load_recipe(None, TINY + ["max_steps=6", *extra]), model=str(tiny_model_dir), data=str(code_dir),
            output=tmp_path / "broken")
    monkeypatch.setattr(Progress, "update", original)
    resumed = fit(load_recipe(None, TINY + ["max_steps=6", *extra]), model=str(tiny_model_dir), data=str(code_dir),
                  output=tmp_path / "broken", resume=True)
    assert resumed["val_loss_after"] == straight["val_loss_after"]

    from qtrain.runs import load_trained

    model = load_trained(tmp_path / "straight")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "BitLinear"


@pytest.mark.parametrize("fused", [True, False])
def test_distillation_starts_from_a_teacher_equal_to_the_student(tmp_path, tiny_model_dir, code_dir, fused):
    """At quantisation strength 0 the student is the model before conversion, which is the teacher: the KL term
    is zero, so with distill_weight=1 the first step's objective is 0 (and not 0 once the student is ternary)."""
    recipe = load_recipe(None, TINY + ["max_steps=4", "bitnet_warmup_steps=2", "save_every=0", "distill_weight=1.0",
                                       "distill_temperature=2.0", f"fused_cross_entropy={str(fused).lower()}"])
    summary = fit(recipe, model=str(tiny_model_dir), data=str(code_dir), output=tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # (a random-init model's outputs are near uniform either way, so the ternary student's KL is small too)
    assert lines[0]["bitnet_strength"] == 0.0 and lines[0]["loss"] == 0.0 and lines[0]["grad_norm"] < 1e-6
    assert lines[-1]["bitnet_strength"] == 1.0 and lines[-1]["loss"] > 5e-5 and lines[-1]["grad_norm"] > 1e-3
    assert summary["distill"] == {"weight": 1.0, "temperature": 2.0, "teacher_dtype": "float32"}
    # validation is plain cross-entropy of the ternary model (the objective's value is not a perplexity)
    assert summary["val_perplexity_after"] > 1.0


@pytest.mark.parametrize("kind,tolerance", [("int8", 0.02), ("nf4", 0.25)])  # NF4: ~0.1 a weight, random init
def test_a_quantized_teacher_keeps_head_and_embeddings_and_computes_near_the_float_model(kind, tolerance):
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from qtrain.methods import quantize_frozen_linears

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        ref = model(ids).logits
    teacher = copy.deepcopy(model)
    assert quantize_frozen_linears(teacher, kind, torch.device("cpu")) == 2 * 7
    mlp = teacher.model.layers[1].mlp.down_proj
    assert type(mlp).__name__ == {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[kind] and not mlp.weight.requires_grad
    head = teacher.get_output_embeddings()
    assert type(head) is nn.Linear and head.weight is teacher.get_input_embeddings().weight  # still tied, fp32
    layer_bytes = sum(p.numel() * p.element_size() for p in teacher.model.layers.parameters())
    assert layer_bytes < sum(p.numel() * p.element_size() for p in model.model.layers.parameters()) / 3
    with torch.no_grad():
        got = teacher(ids).logits
    error = ((got - ref).norm() / ref.norm()).item()
    assert 0 < error < tolerance, error


def test_distillation_from_an_nf4_teacher_trains_and_the_planner_counts_it_smaller(tmp_path, tiny_model_dir,
                                                                                    code_dir):
    """At strength 0 the student is the float model and the teacher its NF4 copy: the KL term is small but no
    longer exactly 0 (against the float teacher's 0.0 in the test above)."""
    from qtrain.plan import model_shape, predict
    from qtrain.recipe import Recipe

    recipe = load_recipe(None, TINY + ["max_steps=3", "bitnet_warmup_steps=2", "save_every=0", "distill_weight=1.0",
                                       "distill_teacher_dtype=nf4"])
    summary = fit(recipe, model=str(tiny_model_dir), data=str(code_dir), output=tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["bitnet_strength"] == 0.0 and 0.0 < lines[0]["loss"] < 0.05
    assert summary["distill"]["teacher_dtype"] == "nf4" and summary["val_perplexity_after"] > 1.0
    shape = model_shape(None)
    weights = {d: predict(shape, Recipe(method="bitnet", seq_len=512, distill_weight=0.5, distill_teacher_dtype=d),
                          "cpu").terms["teacher_weights"] for d in ("float32", "bfloat16", "int8", "nf4")}
    assert weights["float32"] > weights["bfloat16"] > weights["int8"] > weights["nf4"]
    # the embedding (tied head) stays fp32 on a CPU
    assert weights["nf4"] > shape.vocab * shape.hidden * 4


def test_distillation_is_refused_outside_bitnet():
    from qtrain.recipe import RecipeError

    with pytest.raises(RecipeError, match="distill_weight.*method=lora"):
        load_recipe(None, ["method=lora", "distill_weight=0.5"])
    for bad in ("distill_weight=1.5", "distill_temperature=0", "distill_temperature=nan"):
        with pytest.raises(RecipeError, match=bad.split("=")[0]):
            load_recipe(None, ["method=bitnet", bad])


@pytest.fixture(scope="module")
def ternary_dir(tmp_path_factory, code_dir):
    """A 1-layer BitNet model saved packed; hidden 256 so q/k/v/o/gate/up rows are one TQ block each."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp_path = tmp_path_factory.mktemp("ternary")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([p.read_text() for p in sorted(code_dir.iterdir())],
                            trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=256, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg)
    bitnet.convert(m)
    bitnet.save_packed(m, fast, tmp_path / "bit", False, 1e-6)
    return tmp_path / "bit", fast


def test_ternary_gguf_uses_tq_types_where_rows_allow_and_reads_back_exactly(ternary_dir, tmp_path, code_dir):
    from qtrain.export.gguf import export_gguf

    bit_dir, fast = ternary_dir
    (tmp_path / "bit").symlink_to(bit_dir)
    report = export_gguf(str(tmp_path / "bit"), tmp_path / "bit.gguf", data=str(code_dir), positions=128,
                         pre_tokenizer="gpt-2")
    assert report["outtype"] == "tq2_0"
    tw = report["verify"]["ternary_weights"]
    assert tw["types"] == {"TQ2_0": 6, "Q8_0": 1} and tw["ternary_pattern_equal"]
    assert tw["max_relative_error"] <= 2**-11  # fp16 scale rounding only
    assert report["verify"]["next_token_agreement"] >= 0.9  # vs the int8-activation model in PyTorch
    tq1 = export_gguf(str(tmp_path / "bit"), tmp_path / "bit1.gguf", outtype="tq1_0", data=str(code_dir),
                      positions=128, pre_tokenizer="gpt-2")
    assert tq1["verify"]["ternary_weights"]["types"] == {"TQ1_0": 6, "Q8_0": 1}
    assert tq1["bytes"] < report["bytes"]


    from qtrain.export import ExportError
    from qtrain.export.onnx import ExportOptions, export_onnx

    with pytest.raises(ExportError, match="BitNet.*--gguf --outtype tq2_0"):
        export_onnx(str(tmp_path / "bit"), tmp_path / "onnx", ExportOptions(), say=lambda *_: None)
    with pytest.raises(ExportError, match=r"BitNet \(ternary\) runs only"):
        export_gguf(str(tiny_dir_of(tmp_path, fast)), tmp_path / "plain.gguf", outtype="tq2_0", pre_tokenizer="gpt-2")


def test_ternary_gguf_runs_in_llama_cpp(ternary_dir, tmp_path, code_dir):
    """llama.cpp itself (TQ2_0 kernels, 8-bit activations) against the PyTorch BitNet model."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
    from qtrain.export.gguf import export_gguf

    report = export_gguf(str(ternary_dir[0]), tmp_path / "bit.gguf", data=str(code_dir), positions=256,
                         pre_tokenizer="gpt-2")
    lc = report["verify"]["llama_cpp"]
    assert lc["positions"] >= 200 and lc["next_token_agreement"] >= 0.9, lc


def tiny_dir_of(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "plain"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_the_planner_knows_bitnet_memory():
    from qtrain.plan import model_shape, predict
    from qtrain.recipe import Recipe

    s = model_shape(None)
    full = predict(s, Recipe(method="full", seq_len=512), "cpu")
    bit = predict(s, Recipe(method="bitnet", seq_len=512), "cpu")
    assert bit.terms["weights"] == full.terms["weights"] and bit.terms["optimizer_states"] == full.terms["optimizer_states"]
    # one quantised copy of the linear weights per layer in flight, and each layer's own quantised inputs
    assert bit.terms["activations"] - full.terms["activations"] == s.n_layers * (
        sum(s.layer_linear_params().values()) * 4 + 4 * s.hidden * 4 * 512)


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, tiny_model_dir, code_dir):
    """A tiny BitNet run (a packed ternary checkpoint written by qtrain) and its summary."""
    out = tmp_path_factory.mktemp("packed") / "run"
    summary = fit(load_recipe(None, TINY + ["max_steps=3", "save_every=0"]), model=str(tiny_model_dir),
                  data=str(code_dir), output=out)
    return out, summary


def _val_loss(model, recipe, data_dir, tokenizer_dir) -> float:
    from qtrain.loss import forward_loss_sum
    from qtrain.models import load_tokenizer, resolve_model_source
    from qtrain.train import build_data

    packed = build_data(str(data_dir), recipe, load_tokenizer(resolve_model_source(str(tokenizer_dir))))
    total = n = 0.0
    with torch.no_grad():
        for s in range(0, len(packed.val_ids), 2):
            y = packed.val_labels[s:s + 2]
            total += float(forward_loss_sum(model, model, packed.val_ids[s:s + 2], y, None))
            n += int((y[:, 1:] != -100).sum())
    return total / n


def test_unpacking_a_checkpoint_reproduces_its_ternary_values_scales_and_forward(packed_run):
    from transformers.integrations.bitnet import unpack_weights

    from qtrain.models import load_model, resolve_model_source

    run, _ = packed_run
    reference = bitnet.load_packed(run).eval()
    model = load_model(resolve_model_source(str(run)))
    names = bitnet.from_packed(model)
    assert names and all(isinstance(m, bitnet.BitNetLinear) for m in bitnet.layers(model).values())
    for name in names:
        packed_layer = reference.get_submodule(name)
        t, scale = bitnet.ternarize(model.get_submodule(name).weight)
        torch.testing.assert_close(t, unpack_weights(packed_layer.weight, torch.float32)[: t.shape[0]], rtol=0, atol=0)
        # the scale is recomputed as a mean over the layer's weights in fp32: equal up to that sum's rounding
        torch.testing.assert_close(scale.reshape(1), packed_layer.weight_scale.float(), rtol=5e-5, atol=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    # and t / scale alone would not: its absmean scale is off by the share of non-zeros
    layer = model.get_submodule(names[0])
    t, scale = bitnet.ternarize(layer.weight)
    assert float(bitnet.ternarize(t / scale)[1]) > 1.05 * float(scale)


def test_full_ternary_qat_of_a_packed_checkpoint_round_trips(packed_run, tmp_path, tiny_model_dir, code_dir):
    run, first = packed_run
    recipe = load_recipe(None, TINY + ["max_steps=2", "save_every=0"])
    again = fit(recipe, model=str(run), data=str(code_dir), output=tmp_path / "qat")
    # it starts where the packed checkpoint is (its bf16 embeddings round the first run's fp32 ones)
    assert again["val_loss_before"] == pytest.approx(first["val_loss_after"], rel=2e-3)
    assert bitnet.is_bitnet_dir(tmp_path / "qat")
    # train -> save -> load -> the training model's validation loss (the summary's is from the training forward)
    loaded = bitnet.load_packed(tmp_path / "qat").eval()
    assert _val_loss(loaded, recipe, code_dir, tiny_model_dir) == pytest.approx(again["val_loss_after"], rel=2e-3)
    from qtrain.recipe import RecipeError

    with pytest.raises(RecipeError, match="ternary.*method=bitnet.*method=lora"):
        fit(load_recipe(None, TINY + ["method=full", "max_steps=1"]), model=str(run), data=str(code_dir),
            output=tmp_path / "full")


def test_lora_on_a_frozen_ternary_base_saves_adapters_and_refuses_to_merge(packed_run, tmp_path, tiny_model_dir,
                                                                            code_dir):
    from qtrain.models import ModelError
    from qtrain.runs import load_merged, load_trained

    run, _ = packed_run
    recipe = load_recipe(None, [*TINY[:-1], "method=lora", "lora_r=4", "lora_alpha=8", "lora_dropout=0",
                                "max_steps=2", "save_every=0"])
    summary = fit(recipe, model=str(run), data=str(code_dir), output=tmp_path / "lora")
    assert summary["trainable_params"] < summary["total_params"] / 5  # only the adapters train
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "lora" / "model.safetensors").exists()  # the ternary base is not copied
    model = load_trained(tmp_path / "lora").eval()
    assert isinstance(model.get_base_model().model.layers[0].mlp.down_proj.base_layer, bitnet.BitNetLinear)
    assert summary["val_loss_after"] != summary["val_loss_before"]
    assert _val_loss(model, recipe, code_dir, tiny_model_dir) == pytest.approx(summary["val_loss_after"], rel=1e-5)
    with pytest.raises(ModelError, match="merging is refused"):
        load_merged(tmp_path / "lora")


def test_gptq_shadow_weights_ternarise_back_to_the_gptq_values_and_scale():
    from qtrain.bitnet_gptq import gptq_ternary, shadow_for

    torch.manual_seed(0)
    w = torch.randn(24, 40) * 0.05
    x = torch.randn(200, 40) * torch.linspace(0.2, 3, 40)  # inputs of uneven energy, as a layer sees
    h = x.T @ x
    scale = float(w.abs().mean())
    t, resid = gptq_ternary(w, h, scale)
    assert set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
    shadow = shadow_for(t, resid, scale)
    t2, inv = bitnet.ternarize(shadow)  # what the training layer computes from the shadow weights
    assert torch.equal(t2.double(), t)
    assert float(1 / inv) == pytest.approx(scale, rel=1e-5)
    zeros = t == 0  # the residuals stay, so the straight-through estimator still sees what is near a threshold
    assert float(shadow[zeros].abs().max()) > 0.2 * scale


def test_gptq_start_lowers_the_output_error_of_rounding_and_keeps_the_forward_reproducible(tiny_model_dir):
    """On calibration inputs GPTQ's ternary layers reproduce the layer outputs better than absmean rounding does
    (the quantity it minimises; summed over layers); the training forward at strength 1 is what it set."""
    from transformers import AutoModelForCausalLM

    from qtrain.bitnet_gptq import gptq_start

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    bitnet.convert(model)
    calib = torch.randint(0, model.config.vocab_size, (4, 32))
    seen = []
    report = gptq_start(model, calib, progress=seen.append)
    assert report["layers"] == 14 and report["calibration_tokens"] == 128
    assert report["output_error_vs_absmean"] < 1.0
    assert len(seen) == 2  # one line per decoder block
    for m in bitnet.layers(model).values():
        t, inv = bitnet.ternarize(m.weight)
        assert set(t.unique().tolist()) <= {-1.0, 0.0, 1.0} and torch.isfinite(inv)
