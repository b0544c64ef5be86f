"""Causal-LM loss without materialising the [tokens, vocab] logits: chunked, fused linear + cross-entropy.

With a 49k vocabulary, a 512-token sequence has 100 MB of fp32 logits; the usual path keeps them, their
log-softmax and their gradient alive at once, and on a CPU the passes over them cost ~15% of a LoRA step.
Here the LM head and the loss are computed chunk by chunk, and the gradients w.r.t. the hidden states (and
the head weight, if it trains) are computed in the same pass and only *scaled* in backward (the approach of
Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024). Peak extra memory is one chunk of logits.

We write our own because neither transformers nor peft ship one for CPU; Liger's is Triton (CUDA only).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

IGNORE = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with each position: labels[:, 1:] padded with IGNORE at the end.

    Shifting the labels rather than slicing the logits avoids a full-size zero-filled gradient for the slice.
    """
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        # hidden [N, H], weight [V, H], targets [N] (IGNORE = skip). Returns the *sum* of token losses.
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # at least fp32 for softmax and sums
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for s in range(0, n, chunk_rows):
            h = hidden[s:s + chunk_rows]
            y = targets[s:s + chunk_rows]
            valid = y != IGNORE
            logits = (h @ weight.t()).to(acc)
            rows = torch.arange(len(y), device=y.device)
            y0 = y.clamp_min(0)
            target_logit = logits[rows, y0]
            # log-sum-exp by hand, in place: one exp pass over the chunk serves both the loss and the
            # softmax of the gradient (torch.logsumexp allocates and exponentiates a second copy)
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            norm = probs.sum(dim=-1, keepdim=True)
            lse = (top + norm.log()).squeeze(-1)
            total += ((lse - target_logit) * valid).sum()
            if need_h or need_w:
                # d(sum loss)/d(logits) = softmax - onehot, zero on ignored rows
                grad = probs.div_(norm)
                grad[rows, y0] -= 1.0
                if not bool(valid.all()):
                    grad[~valid] = 0.0
                grad = grad.to(hidden.dtype)
                if need_h:
                    grad_h[s:s + chunk_rows] = grad @ weight
                if need_w:
                    grad_w.addmm_(grad.t().to(acc), h.to(acc))
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_rows: int = 256) -> torch.Tensor:
    """Sum of next-token cross-entropy of ``hidden @ weight.T`` against ``labels`` (hidden [B, T, H], labels [B, T])."""
    targets = shift_labels(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        with torch.no_grad():
            return _loss_only(flat, weight, targets, chunk_rows)
    return _FusedLinearCrossEntropy.apply(flat, weight, targets, chunk_rows)


def _loss_only(hidden, weight, targets, chunk_rows):
    acc = torch.promote_types(hidden.dtype, torch.float32)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk_rows):
        logits = (hidden[s:s + chunk_rows] @ weight.t()).to(acc)
        y = targets[s:s + chunk_rows]
        total += torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")
    return total


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over non-ignored positions (logits [B, T, V], labels [B, T])."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).to(acc),
                                             shift_labels(labels).reshape(-1), ignore_index=IGNORE, reduction="sum")


def fused_head(model: nn.Module) -> nn.Linear | None:
    """The plain bias-free LM head the fused loss can stand in for, or None (then use the logits path).

    Not fusable: a head with LoRA or a bias, soft-capped logits (Gemma 2), or a forward without
    ``logits_to_keep`` (then the full logits would be computed anyway).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" not in inspect.signature(base.forward).parameters or not hasattr(base, "get_decoder"):
        return None
    return head


def forward_loss_sum(net: nn.Module, model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                     head: nn.Linear | None) -> torch.Tensor:
    """Summed next-token loss of a batch; ``net`` may be a DDP wrapper of ``model`` (always called through it)."""
    if head is None:
        return causal_lm_loss_sum(net(input_ids=input_ids, use_cache=False).logits, labels)
    captured = {}

    def grab(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hook = base.get_decoder().register_forward_hook(grab)
    try:
        # logits for one position only; the loss is computed from the decoder's output below
        net(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return fused_linear_cross_entropy(captured["h"], head.weight, labels)
