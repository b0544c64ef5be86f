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
from dataclasses import dataclass

import torch
from torch import nn

IGNORE = -100
# rows of logits per chunk in the distillation loss: it holds about six [rows, vocab] fp32 tensors at once
# (student and teacher log-probabilities, their softmaxes, the gradient), against three for cross-entropy
DISTILL_CHUNK_ROWS = 128


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
        ctx.consumed = False
        return total

    @staticmethod
    def backward(ctx, grad_out):
        # The gradients were computed in forward; scaling them in place, rather than into new tensors, saves a
        # second [vocab, hidden] fp32 buffer while the head's gradient is handed over (147 MiB at a 100k
        # vocabulary and hidden 384). The saved tensors are consumed, so a second backward through this node is
        # refused instead of scaling twice.
        if ctx.consumed:
            raise RuntimeError("backward through the fused linear cross-entropy can run once (no retain_graph)")
        ctx.consumed = True
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(grad_out).to(ctx.weight_dtype) if grad_w is not None else None
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
    if "logits_to_keep" not in inspect.signature(base.forward).parameters or decoder_of(base) is None:
        return None
    return head


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The module whose output is the last hidden states (``model.model`` for Llama, ``model.gpt_neox`` for
    GPT-NeoX), or None. ``get_decoder()`` is not enough: for a family that does not define it, transformers'
    default answers with the causal-LM model itself, whose output is the logits."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None)
    return None if decoder is None or decoder is model else decoder


@dataclass
class Teacher:
    """The frozen model a student distils from (``Recipe.distill_*``): its forward runs without gradients, and
    ``head`` is its fusable LM head (None: its full logits are computed)."""

    model: nn.Module
    weight: float
    temperature: float
    head: nn.Linear | None = None


def forward_loss_sum(net: nn.Module, model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                     head: nn.Linear | None, teacher: Teacher | None = None) -> torch.Tensor:
    """Summed next-token loss of a batch; ``net`` may be a DDP wrapper of ``model`` (always called through it).
    With a ``teacher``, the distillation objective instead (see :func:`distill_loss_sum`)."""
    fused = head is not None and (teacher is None or teacher.head is not None)
    if not fused:
        logits = net(input_ids=input_ids, use_cache=False).logits
        if teacher is None:
            return causal_lm_loss_sum(logits, labels)
        with torch.no_grad():
            teacher_logits = teacher.model(input_ids=input_ids, use_cache=False).logits
        return distill_loss_sum(logits, teacher_logits, labels, teacher.weight, teacher.temperature)
    # under mixed precision the decoder's output comes out in the compute dtype and the head's weight is an fp32
    # master: the head and the loss run in fp32 (the loss is computed in fp32 anyway). Running the head's matmuls
    # in bf16 instead was no faster for full fine-tuning on a CPU (177-191 against 190-193 tokens/s, alternating
    # runs) and held a bf16 copy of the head and its gradient (+0.2 GiB peak), so it is not done.
    hidden = _decoder_output(net, model, input_ids).to(head.weight.dtype)
    if teacher is None:
        return fused_linear_cross_entropy(hidden, head.weight, labels)
    with torch.no_grad():
        teacher_hidden = _decoder_output(teacher.model, teacher.model, input_ids).to(teacher.head.weight.dtype)
    return fused_linear_distill(hidden, head.weight, teacher_hidden, teacher.head.weight, labels, teacher.weight,
                                teacher.temperature)


def _decoder_output(net: nn.Module, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H], with the LM head run for one position only."""
    captured = {}

    def grab(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hook = decoder_of(base).register_forward_hook(grab)
    try:
        net(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return captured["h"]


# ---------------------------------------------------------------------------------------------- distillation


def distill_loss_sum(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, weight: float,
                     temperature: float) -> torch.Tensor:
    """Sum over target tokens of ``(1 - weight) * CE + weight * T^2 * KL(p_teacher,T || p_student,T)``
    (Hinton et al. 2015: T^2 keeps the soft term's gradient scale independent of T). Positions whose label is
    ignored (prompt, padding) carry neither term. The reference form, on full logits; the fused one below
    computes the same without them."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    z = logits.reshape(-1, logits.size(-1)).to(acc)
    t = teacher_logits.reshape(-1, teacher_logits.size(-1)).to(acc)
    y = shift_labels(labels).reshape(-1)
    valid = y != IGNORE
    ce = torch.nn.functional.cross_entropy(z, y, ignore_index=IGNORE, reduction="none")
    kl = torch.nn.functional.kl_div(torch.log_softmax(z / temperature, -1), torch.log_softmax(t / temperature, -1),
                                    log_target=True, reduction="none").sum(-1)
    return (((1 - weight) * ce + weight * temperature ** 2 * kl) * valid).sum()


def _distill_chunk(logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, weight: float,
                   temperature: float, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed objective, d objective / d logits or None) for one chunk of rows; both logits fp32 [n, V]."""
    rows = torch.arange(len(y), device=y.device)
    valid = y != IGNORE
    y0 = y.clamp_min(0)
    log_p = torch.log_softmax(logits, -1)
    log_p_t = log_p if temperature == 1 else torch.log_softmax(logits / temperature, -1)
    log_q_t = torch.log_softmax(teacher_logits.div_(temperature), -1)
    del teacher_logits
    q_t = log_q_t.exp()
    kl = (q_t * (log_q_t - log_p_t)).sum(-1)
    del log_q_t
    ce = -log_p[rows, y0]
    total = (((1 - weight) * ce + weight * temperature ** 2 * kl) * valid).sum()
    if not need_grad:
        return total, None
    # d/dz [(1-w) CE + w T^2 KL] = (1-w) (softmax(z) - onehot) + w T (softmax(z/T) - softmax(t/T))
    soft = None if temperature == 1 else log_p_t.exp_()  # log_p_t is log_p itself at T = 1
    grad = log_p.exp_()  # softmax(z), in place: CE and KL are already summed
    if soft is None:
        grad.sub_(q_t, alpha=weight)
    else:
        grad.mul_(1 - weight).add_(soft.sub_(q_t), alpha=weight * temperature)
    grad[rows, y0] -= 1 - weight
    if not bool(valid.all()):
        grad[~valid] = 0.0
    return total, grad


class _FusedLinearDistill(torch.autograd.Function):
    """The distillation objective from the student's and the teacher's last hidden states, chunk by chunk, so
    neither model's [tokens, vocab] logits exist whole; the gradient is computed in the same pass (as in
    :class:`_FusedLinearCrossEntropy`)."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, alpha, temperature, chunk_rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], chunk_rows):
            h = hidden[s:s + chunk_rows]
            logits = (h @ weight.t()).to(acc)
            teacher_logits = (teacher_hidden[s:s + chunk_rows] @ teacher_weight.t()).to(acc)
            part, grad = _distill_chunk(logits, teacher_logits, targets[s:s + chunk_rows], alpha, temperature,
                                        need_h or need_w)
            total += part
            if grad is not None:
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
        return gh, gw, None, None, None, None, None, None


def fused_linear_distill(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                         teacher_weight: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float,
                         chunk_rows: int = DISTILL_CHUNK_ROWS) -> torch.Tensor:
    """:func:`distill_loss_sum` of ``hidden @ weight.T`` against ``teacher_hidden @ teacher_weight.T``."""
    targets = shift_labels(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    teacher_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        with torch.no_grad():
            acc = torch.promote_types(hidden.dtype, torch.float32)
            total = torch.zeros((), dtype=acc, device=hidden.device)
            for s in range(0, flat.shape[0], chunk_rows):
                total += _distill_chunk((flat[s:s + chunk_rows] @ weight.t()).to(acc),
                                        (teacher_flat[s:s + chunk_rows] @ teacher_weight.t()).to(acc),
                                        targets[s:s + chunk_rows], alpha, temperature, False)[0]
            return total
    return _FusedLinearDistill.apply(flat, weight, teacher_flat, teacher_weight.detach(), targets, alpha,
                                     temperature, chunk_rows)
