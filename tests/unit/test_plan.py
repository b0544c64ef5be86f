import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from qtrain.plan import (FULL_GRADIENT_OVERLAP, HOST_HEAP, NF4_BYTES_PER_PARAM, BudgetError, formula_layer_bytes,
                         layer_activation_bytes, parse_bytes,
                         plan_recipe, predict)
from qtrain.recipe import Recipe
from qtrain.shapes import known_models, lookup_known, shape_from_config


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 * 2**30 == parse_bytes("8 GiB") == parse_bytes("8g")
    assert parse_bytes("512MB") == 512 * 2**20
    assert parse_bytes("7.5GB") == int(7.5 * 2**30)
    for bad in ("eight", "-1GB", "0GB", "8 parsecs"):
        with pytest.raises(BudgetError, match="budget"):
            parse_bytes(bad)


@pytest.mark.parametrize("name", sorted(known_models()))
def test_every_shipped_config_reads(name):
    s = shape_from_config(lookup_known(name), name)
    assert s.total_params() > 1e8 and s.n_layers > 0


def test_parameter_counts_match_published_sizes():
    published = {"codellama/CodeLlama-7b-hf": 6.74e9, "mistralai/Mistral-7B-v0.1": 7.24e9, "tiiuae/falcon-7b": 6.92e9,
                 "bigcode/starcoderbase": 15.5e9, "HuggingFaceTB/SmolLM2-135M": 134.5e6,
                 "meta-llama/Llama-3.1-8B": 8.03e9, "Qwen/Qwen2.5-Coder-1.5B": 1.54e9}
    for name, n in published.items():
        assert shape_from_config(lookup_known(name), name).total_params() == pytest.approx(n, rel=0.01)


def test_7b_terms_against_hand_computed_values():
    s = shape_from_config(lookup_known("codellama/CodeLlama-7b-hf"), "cl7")
    r = Recipe(method="qlora", dtype="bfloat16", seq_len=2048, micro_batch_size=2, grad_accum_steps=1, lora_r=8,
               lora_dropout=0.0, gradient_checkpointing=True, target_modules="all-linear")
    p = predict(s, r, "cuda")
    h, i, L, V = 4096, 11008, 32, 32016
    linear = L * (4 * h * h + 3 * h * i)
    assert p.terms["weights"] == int(linear * NF4_BYTES_PER_PARAM + (2 * V * h + L * 2 * h + h) * 2)
    lora = L * 8 * (4 * (h + h) + 2 * (h + i) + (i + h))
    assert p.terms["lora_parameters"] == lora * 4 and p.terms["optimizer_states"] == lora * 8
    tokens = 2 * 2048
    one_layer = tokens * (2 * (8 * h + 2 * h + 4 * i + 32 + 2) - 2 * h * 2 + 7 * 8 * 2)
    assert p.terms["activations"] == L * tokens * h * 2 + one_layer
    assert p.terms["logits_and_loss"] == 256 * V * 4 * 2 + tokens * h * 4 * 2


def test_full_fine_tuning_counts_only_the_gradients_live_at_the_start_of_backward_on_cpu():
    s = shape_from_config(lookup_known("HuggingFaceTB/SmolLM2-135M"), "smollm2")
    all_grads = s.total_params() * 4
    one = Recipe(method="full", seq_len=512, micro_batch_size=1, grad_accum_steps=1, gradient_checkpointing=False)
    p = predict(s, one, "cpu", allocator="glibc")
    head = s.vocab * s.hidden * 4
    assert p.terms["gradients"] == head + int(FULL_GRADIENT_OVERLAP["glibc"] * p.terms["activations"]) < all_grads
    assert "allocator_retention" not in p.terms
    # gradients kept across micro-batches, checkpointing (the peak is then at the end of backward) and a GPU
    # (no CPU heap) count every gradient
    for r, device in ((one.replace(grad_accum_steps=2), "cpu"),
                      (one.replace(gradient_checkpointing=True), "cpu"), (one, "cuda")):
        assert predict(s, r, device, allocator="glibc").terms["gradients"] == all_grads
    assert predict(s, one.replace(grad_accum_steps=2), "cpu", allocator="glibc").peak_bytes > p.peak_bytes
    # jemalloc hands freed activation memory to the gradients: only the LM head's is extra, nothing is retained
    j = predict(s, one, "cpu", allocator="jemalloc")
    assert j.terms["gradients"] == head and "allocator_retention" not in j.terms and j.peak_bytes < p.peak_bytes


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_optimizer_step_is_a_peak_of_its_own_when_gradients_outweigh_activations(device):
    """Full fine-tuning of an 8B model at one short sequence: activations are small beside the weights, so the
    backward's peak (where freed activations absorb most gradients) is below what the step must hold: weights,
    every gradient, both AdamW states and the step's temporaries (16 bytes a parameter and more)."""
    s = shape_from_config(lookup_known("meta-llama/Llama-3.1-8B"), "llama-8b")
    r = Recipe(method="full", seq_len=512, micro_batch_size=1, grad_accum_steps=1, gradient_checkpointing=False)
    p = predict(s, r, device, allocator="jemalloc")
    n = s.total_params()
    phase, terms = p.peak_terms
    assert phase == "optimizer step" and sum(terms.values()) == p.peak_bytes
    assert terms["gradients"] == 4 * n and terms["optimizer_states"] == 8 * n
    temporaries = terms["optimizer_step_temporaries"]
    # a CPU's for-loop AdamW: two copies of the largest tensor (the 128k x 4096 embedding); CUDA's foreach: every state
    assert temporaries == (2 * 4 * s.vocab * s.hidden if device == "cpu" else 4 * n)
    assert p.peak_bytes > 16 * n + temporaries
    # with LoRA the step holds little: the backward (or, on a CPU, loading) sets the peak
    lora = predict(s, r.replace(method="lora", learning_rate=2e-4), device, allocator="jemalloc")
    assert lora.peak_terms[0] != "optimizer step" and lora.step_peak_bytes < sum(lora.terms.values())


def test_jemalloc_lets_backward_reuse_the_fused_loss_chunks_and_glibc_sums_them():
    s = shape_from_config(lookup_known("HuggingFaceTB/SmolLM2-135M"), "smollm2")
    r = Recipe(method="lora", seq_len=256, micro_batch_size=4, gradient_checkpointing=True)
    tokens = 256 * 4
    one_layer = layer_activation_bytes(s, r, tokens)
    chunks = 256 * s.vocab * 4 * 2  # two fp32 [256, vocab] logits chunks in flight
    hidden = tokens * s.hidden * 4 * 2
    g = predict(s, r, "cpu", allocator="glibc")
    j = predict(s, r, "cpu", allocator="jemalloc")
    assert g.terms["logits_and_loss"] == chunks + hidden
    # checkpointing: the recomputed layer and its backward workspace come after the chunks are freed
    assert j.terms["logits_and_loss"] == max(0, chunks - 2 * one_layer) + hidden
    assert sum(j.terms.values()) == j.peak_bytes
    # without checkpointing only the workspace comes after; a GPU keeps the summed form
    nock = r.replace(gradient_checkpointing=False)
    assert predict(s, nock, "cpu", allocator="jemalloc").terms["logits_and_loss"] == chunks - one_layer + hidden
    assert predict(s, r, "cuda").terms["logits_and_loss"] == chunks + hidden


def test_compute_dtype_is_bf16_on_a_gpu_and_fp32_on_a_cpu():
    from qtrain.plan import candidate_recipes, compute_dtype

    for method in ("full", "lora", "qlora"):
        assert compute_dtype("cuda", method) == "bfloat16" and compute_dtype("cpu", method) == "float32"
    assert {r.dtype for r in candidate_recipes(Recipe(), "cpu")} == {"float32"}


def _saved_bytes_per_layer(h, i, heads, kv, method, dropout, seq=64, rms_norm=False, head_dim=None):
    """Census: bytes autograd saves for one Llama layer (2-layer minus 1-layer model, parameters excluded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtrain.methods import prepare_model

    def census(layers):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=300, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, attn_implementation="sdpa",
                          head_dim=head_dim or h // heads)
        m = prepare_model(LlamaForCausalLM(cfg), Recipe(method=method, lora_r=8, lora_dropout=dropout,
                                                                   bitnet_rms_norm=rms_norm))
        m.train()
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            base.model(input_ids=torch.randint(0, 300, (1, seq)))
        return sum(seen.values())

    return census(2) - census(1)


@pytest.mark.parametrize("h,i,heads,kv", [(96, 160, 6, 2), (128, 352, 4, 4), (80, 200, 5, 1)])
@pytest.mark.parametrize("method,dropout,rms_norm", [("full", 0.0, False), ("lora", 0.0, False), ("lora", 0.1, False),
                                                     ("bitnet", 0.0, False), ("bitnet", 0.0, True)])
def test_activation_formula_matches_a_census_of_saved_tensors(h, i, heads, kv, method, dropout, rms_norm):
    s = shape_from_config({"model_type": "llama", "hidden_size": h, "intermediate_size": i, "num_hidden_layers": 1,
                           "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": 300})
    r = Recipe(method=method, lora_r=8, lora_dropout=dropout, seq_len=64, bitnet_rms_norm=rms_norm)
    saved = _saved_bytes_per_layer(h, i, heads, kv, method, dropout, rms_norm=rms_norm)
    # what the planner uses (the census of qtrain.census for Llama), and the formula kept for other families
    assert layer_activation_bytes(s, r, 64) == saved
    assert formula_layer_bytes(s, r, 64) == saved


@pytest.mark.parametrize("method,dropout", [("full", 0.0), ("lora", 0.0)])
@pytest.mark.parametrize("h,heads,kv,head_dim", [(96, 4, 2, 32), (128, 2, 1, 48)])
def test_activation_formula_follows_an_explicit_head_dim(h, heads, kv, head_dim, method, dropout):
    """Qwen3 and Gemma set head_dim apart from hidden / heads: queries and attention's output are heads x
    head_dim wide, and q_proj/o_proj hold hidden x that many weights."""
    cfg = {"model_type": "llama", "hidden_size": h, "intermediate_size": 160, "num_hidden_layers": 1,
           "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": 300, "head_dim": head_dim}
    s = shape_from_config(cfg)
    assert s.q_dim == heads * head_dim != h and s.kv_dim == kv * head_dim
    r = Recipe(method=method, lora_r=8, lora_dropout=dropout, seq_len=64)
    saved = _saved_bytes_per_layer(h, 160, heads, kv, method, dropout, head_dim=head_dim)
    assert layer_activation_bytes(s, r, 64) == saved
    assert formula_layer_bytes(s, r, 64) == saved
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    assert s.total_params() == sum(p.numel() for p in model.parameters())


def test_embedding_rows_past_the_tokenizer_are_not_counted_for_a_frozen_mapped_table(tmp_path):
    """LoRA on a CPU keeps frozen weights memory-mapped when they are stored in the dtype they run in; rows no
    token can index are never read, so never resident. Tied tables are read whole by the LM head, and a dtype
    conversion at load copies every row."""
    import dataclasses

    from qtrain.models import load_tokenizer, resolve_model_source
    from qtrain.shapes import tokenizer_rows

    tok = load_tokenizer(resolve_model_source(None))
    tok.save_pretrained(tmp_path)
    assert tokenizer_rows(tmp_path) == len(tok)
    assert tokenizer_rows(tmp_path / "missing") == 0
    cfg = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 100_000, "tie_word_embeddings": False, "torch_dtype": "float32"}
    s = dataclasses.replace(shape_from_config(cfg), indexed_vocab=len(tok))
    lora = Recipe(method="lora", dtype="float32")
    base = predict(dataclasses.replace(s, indexed_vocab=0), lora, "cpu", allocator="jemalloc").terms["weights"]
    assert predict(s, lora, "cpu", allocator="jemalloc").terms["weights"] == base - (100_000 - len(tok)) * 128 * 4
    for other in (dataclasses.replace(s, tied=True), dataclasses.replace(s, stored_dtype="bfloat16")):
        assert predict(other, lora, "cpu", allocator="jemalloc").terms["weights"] == other.total_params() * 4
    for unchanged in (lora.replace(method="full"),):
        assert predict(s, unchanged, "cpu", allocator="jemalloc").terms["weights"] == s.total_params() * 4
    assert predict(s, lora, "cuda").terms["weights"] == s.total_params() * 4  # copied to the device whole


def test_plan_prefers_quality_then_sequence_and_explains_what_does_not_fit():
    s = shape_from_config(lookup_known("codellama/CodeLlama-7b-hf"), "CodeLlama-7b")
    base = Recipe(seq_len=1024, micro_batch_size=1, grad_accum_steps=8)
    big = plan_recipe(s, parse_bytes("200GB"), "cuda", base)
    assert big.chosen.recipe.method == "full" and big.chosen.recipe.seq_len == 1024
    mid = plan_recipe(s, parse_bytes("24GB"), "cuda", base)
    assert mid.chosen.recipe.method == "lora"
    small = plan_recipe(s, parse_bytes("8GB"), "cuda", base)
    assert small.chosen.recipe.method == "qlora"
    assert all(c.prediction.peak_bytes <= small.usable_bytes for c in small.candidates)
    with pytest.raises(BudgetError, match=r"budget 2.00 GiB is below the smallest recipe .* try --budget \d") as err:
        plan_recipe(s, parse_bytes("2GB"), "cuda", base)
    # the bytes travel as a field (bench's budget table reads them), and they would fit
    assert err.value.needed_bytes > parse_bytes("2GB")
    assert plan_recipe(s, err.value.needed_bytes + (1 << 20), "cuda", base).chosen is not None


def test_plan_cli_json_offline():
    proc = subprocess.run([sys.executable, "-m", "qtrain", "plan", "--model", "codellama/CodeLlama-7b-hf", "--budget",
                           "8GB", "--device", "cuda", "--json"], capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["chosen"]["method"] == "qlora" and out["chosen"]["predicted_peak_bytes"] < 8 * 2**30
    assert len(out["candidates"]) > 1


@pytest.mark.parametrize("recipe_file,model,device,budget_gib", [
    ("cpu-qlora.yaml", None, "cpu", 8),
    ("cpu-lora.yaml", None, "cpu", 8),
    ("cpu-full.yaml", None, "cpu", 8),
    ("gpu-8gb-qlora.yaml", "codellama/CodeLlama-7b-hf", "cuda", 8),
    ("gpu-8gb-qlora.yaml", "meta-llama/Llama-3.1-8B", "cuda", 8),
    ("gpu-16gb-lora.yaml", "meta-llama/Llama-3.2-3B", "cuda", 16),
    ("gpu-24gb-full.yaml", "Qwen/Qwen2.5-Coder-1.5B", "cuda", 24),
])
def test_named_budget_recipes_fit_their_budget(recipe_file, model, device, budget_gib):
    from pathlib import Path

    from qtrain.plan import model_shape, predict
    from qtrain.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / recipe_file)
    peak = predict(model_shape(model), recipe, device).peak_bytes
    assert peak <= budget_gib * 2**30, f"{recipe_file} with {model}: {peak / 2**30:.2f} GiB > {budget_gib} GiB"


@pytest.mark.parametrize("preset", ["attention", "mlp", "attention+mlp", "all-linear"])
def test_lora_counts_match_peft_and_the_mlp_shape(preset):
    """One preset table: peft's trainable count on a real (random) Llama and a GELU-MLP GPT-NeoX equals the
    planner's, and the adapted share of a layer follows the family's MLP (3 matrices gated, 2 not)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

    from qtrain.methods import resolve_target_modules

    configs = [LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2),
               GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4)]
    for cfg in configs:
        shape = shape_from_config(cfg.to_dict(), cfg.model_type)
        model = AutoModelForCausalLM.from_config(cfg)
        targets = resolve_target_modules(model, preset)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        if cfg.model_type == "llama":  # GPT-NeoX fuses q, k and v: Llama's names do not describe its matrices
            assert shape.lora_params(4, preset) == trainable, cfg.model_type
        n = len(shape.layer_matrices())
        assert n == (7 if shape.gated_mlp else 6)
        want = {"attention": 4, "mlp": n - 4, "attention+mlp": n, "all-linear": n}[preset] / n
        assert shape.adapted_fraction(preset) == pytest.approx(want)


def test_plan_measure_trains_the_pick_and_sets_measured_beside_predicted(tiny_model_dir, code_dir):
    """`qtrain plan --measure` on a CPU: the pick runs in a fresh `qtrain fit` process; the JSON carries both."""
    proc = subprocess.run([sys.executable, "-m", "qtrain", "plan", "--model", str(tiny_model_dir), "--device", "cpu",
                           "--budget", "4GB", "--measure", "--measure-steps", "2", "--data", str(code_dir), "--json",
                           "seq_len=64", "micro_batch_size=2", "grad_accum_steps=1", "lora_r=4"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    (row,) = out["measured"]
    assert row["method"] == out["chosen"]["method"] and row["steps"] == 2
    assert row["measured_peak_bytes"] > 100 * 2**20 and row["measured_tokens_per_second"] > 0
    assert row["peak_error"] == pytest.approx(row["predicted_peak_bytes"] / row["measured_peak_bytes"] - 1, abs=1e-3)
    assert "measuring the pick on cpu" in proc.stderr


def test_the_planner_knows_the_distillation_teacher():
    import inspect

    from qtrain import loss
    from qtrain.plan import DISTILL_CHUNK_ROWS, FUSED_CE_CHUNK_ROWS, model_shape, predict
    from qtrain.recipe import Recipe

    assert DISTILL_CHUNK_ROWS == loss.DISTILL_CHUNK_ROWS
    assert FUSED_CE_CHUNK_ROWS == inspect.signature(loss.fused_linear_cross_entropy).parameters["chunk_rows"].default
    s = model_shape(None)
    plain = predict(s, Recipe(method="bitnet", seq_len=512), "cpu")
    fp32 = predict(s, Recipe(method="bitnet", seq_len=512, distill_weight=0.5), "cpu")
    bf16 = predict(s, Recipe(method="bitnet", seq_len=512, distill_weight=0.5, distill_teacher_dtype="bfloat16"), "cpu")
    assert fp32.terms["teacher_weights"] == s.total_params() * 4 == 2 * bf16.terms["teacher_weights"]
    assert "teacher_weights" not in plain.terms and fp32.peak_bytes > bf16.peak_bytes > plain.peak_bytes
    # one more forward pass per token: slower by about a third of a full step
    assert 1.2 < plain.tokens_per_second / fp32.tokens_per_second < 1.45


def test_several_devices_shard_with_fsdp_only_when_one_device_cannot_hold_the_run():
    from qtrain.plan import model_shape, plan_recipe, predict
    from qtrain.recipe import Recipe

    shape = model_shape("Qwen/Qwen2.5-Coder-1.5B")
    full = Recipe(method="full", dtype="bfloat16", seq_len=1024, micro_batch_size=1, grad_accum_steps=8,
                  gradient_checkpointing=True)
    one = predict(shape, full, "cuda")
    ddp = predict(shape, full, "cuda", devices=4)
    fsdp = predict(shape, full.replace(fsdp=True), "cuda", devices=4)
    # DDP: the whole run on every device, plus its gradient buckets; 4x the tokens/s
    assert {k: v for k, v in ddp.terms.items() if k not in ("ddp_gradient_buckets", "runtime_overhead")} == \
        {k: v for k, v in one.terms.items() if k != "runtime_overhead"}
    assert ddp.terms["ddp_gradient_buckets"] == one.terms["gradients"]
    assert ddp.tokens_per_second == pytest.approx(4 * one.tokens_per_second)
    # FSDP: weights, gradients and optimizer states a quarter each, one gathered unit at a time
    for key in ("weights", "gradients", "optimizer_states"):
        assert fsdp.terms[key] == pytest.approx(one.terms[key] / 4, rel=1e-6)
    assert "autocast_weight_copies" not in fsdp.terms and fsdp.terms["fsdp_gathered_units"] > 0
    assert fsdp.peak_bytes < 0.5 * one.peak_bytes
    # 16 GB devices: full fine-tuning fits only sharded, so the plan shards; 80 GB: it replicates
    base = Recipe(seq_len=1024, micro_batch_size=1, grad_accum_steps=8)
    small = plan_recipe(shape, 16 * 2**30, "cuda", base, devices=4)
    assert small.chosen.recipe.method == "full" and small.chosen.recipe.fsdp
    assert "sharded over 4 devices" in small.reason
    big = plan_recipe(shape, 80 * 2**30, "cuda", base, devices=4)
    assert big.chosen.recipe.method == "full" and not big.chosen.recipe.fsdp
    # one device of 16 GB cannot train it fully at all
    assert plan_recipe(shape, 16 * 2**30, "cuda", base).chosen.recipe.method != "full"


def test_plan_devices_cli_gives_a_plan_and_its_terms():
    proc = subprocess.run([sys.executable, "-m", "qtrain", "plan", "--devices", "4", "--budget", "24GB", "--model",
                           "meta-llama/Llama-3.1-8B", "--device", "cuda", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["devices"] == 4 and out["chosen"]["predicted_peak_bytes"] <= 24 * 2**30 * 0.9
    assert out["chosen"]["terms"]["weights"] > 0 and "fsdp" in out["chosen"]
    bad = subprocess.run([sys.executable, "-m", "qtrain", "plan", "--devices", "0", "--budget", "24GB", "--device",
                          "cuda"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--devices 0" in bad.stderr


def test_fsdp_is_refused_where_it_is_not_written():
    from qtrain.recipe import Recipe, RecipeError

    for method in ("bitnet", "qlora"):
        with pytest.raises(RecipeError, match="fsdp"):
            Recipe(method=method, fsdp=True)


@pytest.mark.parametrize("text,message", [("{not json", "is not valid JSON"), ("[1, 2]", "holds a list")])
def test_a_corrupt_config_json_is_named_with_the_way_out(tmp_path, text, message):
    from qtrain.models import ModelError
    from qtrain.plan import model_shape

    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelError, match=f"config.json {message}.*restore it"):
        model_shape(str(tmp_path))


@pytest.mark.parametrize("family,extra", [
    ("llama", {}),
    ("gemma2", {"head_dim": 16}),  # soft-capped logits by default
    ("cohere", {}),  # scaled logits by default
    ("gpt_bigcode", {}),  # a forward without logits_to_keep
    ("phi", {}),  # an LM head with a bias
    ("gpt2", {}),  # Conv1D layers, and a plain head
])
def test_planner_knows_when_the_fused_loss_stands_in_for_the_head(family, extra):
    # The planner counts chunked logits only where training fuses the head into the loss; elsewhere the whole
    # [tokens, vocab] logits (three copies, four with soft-capping). Both read the same model here.
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtrain.loss import fused_head
    from qtrain.shapes import complete_config

    small = {"hidden_size": 64, "n_embd": 64, "num_hidden_layers": 1, "n_layer": 1, "num_attention_heads": 4,
             "n_head": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512, **extra}
    cfg = AutoConfig.for_model(family, **small)
    model = AutoModelForCausalLM.from_config(cfg)
    raw = {k: v for k, v in cfg.to_diff_dict().items()}  # what save_pretrained writes: defaults left out
    shape = shape_from_config(complete_config({"model_type": family, **raw}), family)
    assert shape.fusable_head == (fused_head(model) is not None)
    recipe = Recipe(method="lora", seq_len=64, micro_batch_size=2, gradient_checkpointing=True)
    logits = predict(shape, recipe, "cpu", allocator="glibc").terms["logits_and_loss"]
    if shape.fusable_head:
        assert logits < 128 * 512 * 4 * 3
    else:
        assert logits == 128 * 512 * 4 * (4 if family == "gemma2" else 3)


@pytest.mark.parametrize("method,gc", [("full", False), ("lora", True)])
def test_with_jemalloc_the_whole_logits_share_memory_with_the_backward_after_them(method, gc):
    # All copies but the logits' gradient are freed before the head's backward, and jemalloc hands their memory
    # to the layers' backward and the gradients allocated after; its fragmentation share is not taken of them.
    shape = shape_from_config({"model_type": "gemma2", "hidden_size": 256, "num_hidden_layers": 4,
                               "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64,
                               "intermediate_size": 1024, "vocab_size": 49152, "final_logit_softcapping": 30.0,
                               "tie_word_embeddings": True}, "gemma2")
    assert not shape.fusable_head
    recipe = Recipe(method=method, seq_len=512, micro_batch_size=1, gradient_checkpointing=gc, grad_accum_steps=1)
    one_copy = 512 * 49152 * 4
    glibc = predict(shape, recipe, "cpu", allocator="glibc")
    jem = predict(shape, recipe, "cpu", allocator="jemalloc")
    assert glibc.terms["logits_and_loss"] == 4 * one_copy
    backward = jem.terms["backward_workspace"] * (2 if gc else 1)  # the recomputed layer, and the workspace
    assert jem.terms["logits_and_loss"] == max(one_copy, 4 * one_copy - backward - jem.terms["gradients"])
    runtime, fragmentation = HOST_HEAP["jemalloc"]
    others = sum(v for k, v in jem.terms.items() if k not in ("runtime_overhead", "logits_and_loss"))
    assert jem.terms["runtime_overhead"] == runtime + int(fragmentation * others)
    # with accumulation the gradients live through the next forward, so they take none of the logits' memory
    accum = predict(shape, dataclasses.replace(recipe, grad_accum_steps=2), "cpu", allocator="jemalloc")
    assert accum.terms["logits_and_loss"] == max(one_copy, 4 * one_copy - backward)
    assert accum.terms["logits_and_loss"] > jem.terms["logits_and_loss"]
