"""Preparing a model for its method: gradient checkpointing that takes effect on every family."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qtrain.methods import checkpointing_takes_effect, prepare_model
from qtrain.recipe import Recipe

TINY = {
    "gpt_bigcode": {"n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": 128, "n_positions": 64,
                    "embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0},  # the same result, run twice
    "llama": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 128},
}


def _build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, **TINY[family])
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


def _saved_bytes_and_grads(model: torch.nn.Module) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd keeps for backward over one training forward, and the gradients it then produces."""
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return saved, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_saves_activations_on_a_family_whose_code_ignores_it(method):
    # transformers' gpt_bigcode accepts gradient_checkpointing_enable() and keeps every activation anyway
    plain = prepare_model(_build("gpt_bigcode"), Recipe(method=method, lora_dropout=0.0))
    plain.train()
    ckpt = prepare_model(_build("gpt_bigcode"), Recipe(method=method, lora_dropout=0.0, gradient_checkpointing=True))
    ckpt.train()
    plain_saved, plain_grads = _saved_bytes_and_grads(plain)
    ckpt_saved, ckpt_grads = _saved_bytes_and_grads(ckpt)
    # the blocks keep their inputs only, and are recomputed in backward with the same result
    assert ckpt_saved < 0.5 * plain_saved
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # names and state dicts are untouched, so adapters and checkpoints save as before
    assert ckpt.state_dict().keys() == plain.state_dict().keys()


def test_families_whose_own_checkpointing_works_are_left_to_it():
    llama = _build("llama")
    llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointing_takes_effect(llama)
    bigcode = _build("gpt_bigcode")
    bigcode.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not checkpointing_takes_effect(bigcode)
    model = prepare_model(_build("llama"), Recipe(method="full", gradient_checkpointing=True))
    assert all("forward" not in vars(layer) for layer in model.model.layers)
