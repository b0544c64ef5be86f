import pytest
import torch

from qtrain.loss import (IGNORE, causal_lm_loss_sum, distill_loss_sum, fused_head, fused_linear_cross_entropy,
                         fused_linear_distill)


@pytest.mark.parametrize("chunk", [3, 7, 64])
@pytest.mark.parametrize("train_weight", [False, True])
def test_fused_loss_and_grads_match_the_logits_path(chunk, train_weight):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=train_weight)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE
    ref = causal_lm_loss_sum(hidden @ weight.t(), labels)
    ref_grads = torch.autograd.grad(ref * 0.37, [hidden] + ([weight] if train_weight else []))
    out = fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk)
    grads = torch.autograd.grad(out * 0.37, [hidden] + ([weight] if train_weight else []))
    torch.testing.assert_close(out, ref.float() if out.dtype == torch.float32 else ref, rtol=1e-6, atol=1e-6,
                               check_dtype=False)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, check_dtype=False)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, labels, chunk), ref.float(),
                                   check_dtype=False)


@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (0.5, 1.0), (0.7, 2.0), (1.0, 0.5)])
@pytest.mark.parametrize("chunk", [4, 64])
def test_fused_distillation_matches_the_reference_objective(alpha, temperature, chunk):
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(2, 9, 16, dtype=torch.float64)
    t_weight = torch.randn(50, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 9))
    labels[1, :3] = IGNORE
    ref = distill_loss_sum(hidden @ weight.t(), t_hidden @ t_weight.t(), labels, alpha, temperature)
    ref_grads = torch.autograd.grad(ref * 0.37, [hidden, weight])
    out = fused_linear_distill(hidden, weight, t_hidden, t_weight, labels, alpha, temperature, chunk_rows=chunk)
    grads = torch.autograd.grad(out * 0.37, [hidden, weight])
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_distill(hidden, weight, t_hidden, t_weight, labels, alpha,
                                                        temperature, chunk), ref)
    if alpha == 0:  # no teacher term: plain cross-entropy
        torch.testing.assert_close(ref, causal_lm_loss_sum(hidden @ weight.t(), labels))


def test_distillation_term_is_zero_against_itself_and_positive_otherwise():
    torch.manual_seed(2)
    logits = torch.randn(1, 6, 20, dtype=torch.float64)
    labels = torch.randint(0, 20, (1, 6))
    for temperature in (1.0, 3.0):
        assert float(distill_loss_sum(logits, logits, labels, 1.0, temperature)) == pytest.approx(0, abs=1e-12)
        assert float(distill_loss_sum(logits, logits.flip(-1), labels, 1.0, temperature)) > 0.1


def test_causal_loss_matches_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[1, :5] = IGNORE
    out = model(input_ids=ids, labels=labels)
    n = int((labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(causal_lm_loss_sum(out.logits, labels) / n, out.loss)
    assert fused_head(model) is model.lm_head


def test_fast_dropout_has_dropout_statistics_and_is_identity_in_eval():
    from qtrain.methods import FastDropout

    torch.manual_seed(0)
    d = FastDropout(0.25)
    x = torch.ones(200_000)
    y = d(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.01
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert abs(y.mean().item() - 1.0) < 0.02
    d.eval()
    assert torch.equal(d(x), x)


def test_fast_dropout_mask_is_uniform_over_positions_and_gradient_uses_the_same_mask():
    from qtrain.methods import FastDropout

    torch.manual_seed(1)
    d = FastDropout(0.1)
    x = torch.ones(4001, 7, requires_grad=True)  # numel not a multiple of 4
    y = d(x)
    kept = (y != 0).float().reshape(-1)
    # each of the four 16-bit words of a 64-bit draw must be an unbiased coin (the top one included)
    for j in range(4):
        assert abs(kept[j::4].mean().item() - 0.9) < 0.01
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(sum)/dx = mask * scale = y for x of ones
    assert FastDropout(0.5)(torch.ones(3, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="1.5"):
        FastDropout(1.5)


def test_lora_dropout_is_swapped_and_training_matches_logits_path(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from qtrain.loss import forward_loss_sum
    from qtrain.methods import FastDropout, prepare_model
    from qtrain.recipe import Recipe

    model = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), Recipe(lora_dropout=0.1, lora_r=4))
    assert any(isinstance(m, FastDropout) for m in model.modules())
    model.eval()  # no dropout: the two loss paths must agree exactly on loss and LoRA grads
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    params = [p for p in model.parameters() if p.requires_grad]
    a = forward_loss_sum(model, model, ids, ids, None)
    ga = torch.autograd.grad(a, params)
    b = forward_loss_sum(model, model, ids, ids, fused_head(model))
    gb = torch.autograd.grad(b, params)
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen2", "mistral", "gpt2"])
def test_fused_loss_matches_the_logits_path_across_families(family):
    """The fused head finds each family's decoder (GPT-NeoX has no get_decoder of its own: transformers' default
    answers with the causal-LM model itself) and gives the logits path's loss and gradients."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtrain.loss import forward_loss_sum

    extra = {"n_embd": 32, "n_layer": 2, "n_head": 4} if family == "gpt2" else {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    if family in ("llama", "qwen2", "mistral"):
        extra["num_key_value_heads"] = 2
    cfg = AutoConfig.for_model(family, vocab_size=96, tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    head = fused_head(model)
    assert head is not None, family
    ids = torch.randint(0, 96, (2, 12))
    params = [p for p in model.parameters() if p.requires_grad]
    a = forward_loss_sum(model, model, ids, ids, None)
    ga = torch.autograd.grad(a, params, allow_unused=True)
    b = forward_loss_sum(model, model, ids, ids, head)
    gb = torch.autograd.grad(b, params, allow_unused=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_fused_loss_scales_its_saved_gradients_once_and_refuses_a_second_backward():
    torch.manual_seed(0)
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (1, 6))
    out = fused_linear_cross_entropy(hidden, weight, labels) * 2.0
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        out.backward()

