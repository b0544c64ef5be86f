"""FLOPs per trained token: the one formula that the training loop's MFU and the planner's throughput
prediction share. Pure arithmetic, no torch, so that offline planning stays light."""

from __future__ import annotations


def train_flops_per_token(frozen_params: int, trainable_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Model FLOPs per trained token (PaLM appendix B; Kaplan et al. 2020).

    A trainable weight costs 6 FLOPs/token (forward 2, input grad 2, weight grad 2); a frozen one 4 (no
    weight grad); attention scores and values add 12 * layers * hidden * seq_len (forward + backward), needed
    for any method. Gradient-checkpointing recomputation is *not* counted: this is MFU, not HFU.
    """
    return 6.0 * trainable_params + 4.0 * frozen_params + 12.0 * n_layers * hidden * seq_len


def recompute_flops_per_token(layer_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """What gradient checkpointing adds: the decoder layers' forward once more (the LM head is not recomputed).
    Hardware FLOPs, so they slow a step but do not count toward MFU."""
    return 2.0 * layer_params + 4.0 * n_layers * hidden * seq_len


def forward_flops_per_token(matmul_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """One forward pass without gradients (a distillation teacher's): 2 FLOPs per matmul weight, plus
    attention's 4 * layers * hidden * seq_len. Counted in the training step's model FLOPs when a teacher runs."""
    return 2.0 * matmul_params + 4.0 * n_layers * hidden * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (measured) FLOP/s."""
    return tokens_per_s * flops_per_token / peak_flops if peak_flops > 0 else 0.0
