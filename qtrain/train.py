"""The one training loop: setup -> model -> data -> optimizer -> loop -> checkpoint -> final save.

Runs unchanged under ``accelerate launch --num_processes N``: every process computes the same packed
dataset, takes its own slice of each optimizer step's samples, and gradients are averaged by DDP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qtrain import checkpoint as ckpt
from qtrain.data.corpus import load_corpus
from qtrain.data.pack import IGNORE, ensure_fim_tokens, pack, tokenize_documents
from qtrain.flops import forward_flops_per_token
from qtrain.io import atomic_write_json
from qtrain.loss import Teacher, forward_loss_sum, fused_head
from qtrain.measure import (bound_heap_retention, cuda_memory_detail, current_rss_bytes, heap_allocator, lr_at,
                            machine_info, matmul_flops, mfu, peak_flops, peak_memory_bytes, tokens_per_second,
                            train_flops_per_token, trim_heap)
from qtrain.methods import count_parameters, prepare_model, quantization_config
from qtrain.models import ModelSource, load_model, load_tokenizer, resolve_model_source
from qtrain.plan import ASSUMED_MFU
from qtrain.recipe import Recipe, RecipeError, save_recipe
from qtrain import sharding
from qtrain.runs import RUN_MARKER, is_run_dir, save_final
from qtrain.errors import QtrainError

log = logging.getLogger(__name__)


class RunError(QtrainError, RuntimeError):
    """The run cannot start (output directory, resume state); the message says what to do."""


# ---------------------------------------------------------------------------------------------- pure helpers

def sample_indices(step: int, micro: int, rank: int, world: int, micro_batch: int, accum: int,
                   n_sequences: int, seed: int, _perms: dict[int, torch.Tensor] | None = None) -> list[int]:
    """Which packed sequences process ``rank`` trains on at optimizer ``step``, micro-step ``micro``.

    A pure function of the position, so a resumed run sees exactly the data an uninterrupted one would:
    epoch ``e`` visits the sequences in ``randperm(n, seed + e)`` order, and the global sample counter
    runs step-major, then micro-step, then rank.
    """
    perms = _perms if _perms is not None else {}
    start = ((step * accum + micro) * world + rank) * micro_batch
    out = []
    for pos in range(start, start + micro_batch):
        epoch, i = divmod(pos, n_sequences)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n_sequences, generator=g)
        out.append(int(perms[epoch][i]))
    return out


def count_target_tokens(labels: torch.Tensor) -> int:
    """Positions that contribute to the causal-LM loss: shifted labels that are not IGNORE."""
    return int((labels[:, 1:] != IGNORE).sum())


def loss_scale(window_tokens_global: int, world_size: int) -> float:
    """Scale for a micro-batch's *summed* token loss so accumulated, DDP-averaged grads equal the grad of the
    mean loss over every target token of the optimizer step (all micro-batches, all processes)."""
    return world_size / max(1, window_tokens_global)


# ---------------------------------------------------------------------------------------------- data

@dataclass
class PackedData:
    train_ids: torch.Tensor
    train_labels: torch.Tensor
    val_ids: torch.Tensor
    val_labels: torch.Tensor
    report: dict[str, Any]
    new_token_ids: list[int]


def build_data(data: str | None, recipe: Recipe, tokenizer, skip_bad_lines: bool = False) -> PackedData:
    train_docs, val_docs, report = load_corpus(
        data, data_format=recipe.data_format, extensions=recipe.extensions, min_file_bytes=recipe.min_file_bytes,
        max_file_bytes=recipe.max_file_bytes, near_dup_threshold=recipe.near_dup_threshold,
        val_fraction=recipe.val_fraction, skip_bad_lines=skip_bad_lines)
    new_ids = ensure_fim_tokens(tokenizer) if recipe.fim_rate > 0 else []
    chat = recipe.instruction_template == "chat" or (
        recipe.instruction_template == "auto" and bool(getattr(tokenizer, "chat_template", None)))
    train_ex = tokenize_documents(train_docs, tokenizer, fim_rate=recipe.fim_rate, fim_mode=recipe.fim_mode,
                                  seed=recipe.seed, chat=chat)
    # Validation is plain causal LM (no FIM), so before/after perplexities are comparable across recipes.
    val_ex = tokenize_documents(val_docs, tokenizer, seed=recipe.seed, chat=chat)
    tr_ids, tr_lab, tr_drop = pack(train_ex, recipe.seq_len)
    va_ids, va_lab, _ = pack(val_ex, recipe.val_seq_len or recipe.seq_len, allow_short=True)
    if len(tr_ids) == 0:
        total = sum(len(e.ids) for e in train_ex)
        from qtrain.data.corpus import DataError
        raise DataError(f"the training split has {total} tokens, fewer than one sequence of seq_len={recipe.seq_len}; "
                        f"give more data or lower seq_len (e.g. seq_len={max(16, 2 ** int(math.log2(max(2, total // 2))))})")
    va_ids, va_lab = va_ids[: recipe.val_max_sequences], va_lab[: recipe.val_max_sequences]
    rep = report.to_dict()
    if any(d.is_instruction for d in train_docs):
        rep["instruction_template"] = "chat" if chat else "alpaca"
    rep.update(train_sequences=len(tr_ids), train_tokens_available=int(tr_ids.numel()), tail_tokens_dropped=tr_drop,
               val_sequences=len(va_ids), val_tokens=int(va_ids.numel()),
               fingerprint=_fingerprint(tr_ids, va_ids))
    return PackedData(tr_ids, tr_lab, va_ids, va_lab, rep, new_ids)


def _fingerprint(*tensors: torch.Tensor) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    for t in tensors:
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- eval

@torch.no_grad()
def evaluate(model, ids: torch.Tensor, labels: torch.Tensor, micro_batch: int, accelerator, head=None,
             unwrapped=None, lockstep: bool = False) -> float:
    """Mean next-token loss over the validation sequences, shared across processes. ``lockstep``: every process
    runs the same number of forwards (a sharded model all-gathers in each one)."""
    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    # in lockstep, a process whose slice has run out repeats the first batch and does not count it
    rounds = math.ceil(len(ids) / (world * micro_batch))
    for i in range(rounds):
        start = (i * world + rank) * micro_batch
        counted = start < len(ids)
        if not counted and not lockstep:
            break
        start = start if counted else 0
        x = ids[start:start + micro_batch].to(accelerator.device)
        y = labels[start:start + micro_batch].to(accelerator.device)
        loss = forward_loss_sum(model, unwrapped or model, x, y, head).double()
        if counted:
            total[0] += loss
            total[1] += count_target_tokens(y)
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


# ---------------------------------------------------------------------------------------------- output dir

def prepare_output_dir(output: Path, resume: bool, overwrite: bool, check_only: bool = False) -> None:
    """Check (and with --overwrite clear) the output directory; never delete what is not a qtrain run.

    Called twice: first ``check_only`` before anything is loaded, then for real once model and data loaded
    fine, so a bad --data never costs the run that --overwrite would have replaced.
    """
    if resume:
        if not output.is_dir():
            raise RunError(f"--resume: output directory {str(output)!r} does not exist; nothing to resume. "
                           "Drop --resume to start a new run")
        if ckpt.latest_checkpoint(output) is None:
            raise RunError(f"--resume: {str(output)!r} holds no checkpoint; start again with --overwrite")
        return
    if output.exists() and not output.is_dir():
        raise RunError(f"--output {str(output)!r} is a file; choose a directory path")
    if output.is_dir() and any(output.iterdir()):
        if not is_run_dir(output):
            raise RunError(f"--output {str(output)!r} is not empty and is not a qtrain run (no valid run.json); choose "
                           "another directory (qtrain will not delete files it did not write)")
        if not overwrite:
            raise RunError(f"--output {str(output)!r} already holds a run; pass --resume to continue it or "
                           "--overwrite to replace it")
        if not check_only:
            shutil.rmtree(output)
    if not check_only:
        output.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------- progress

class Progress:
    """A rich progress bar on a terminal; plain log lines otherwise (CI, files)."""

    def __init__(self, total: int, start: int, enabled: bool):
        from rich.console import Console

        self.enabled = enabled
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.bar = None
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                    TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()
        self.total = total

    def update(self, step: int, info: str, every: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step % every == 0 or step == self.total:
            self.console.print(f"step {step}/{self.total} {info}", highlight=False)

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------------------- fit

def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("qtrain", "torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _print(accelerator, msg: str) -> None:
    if accelerator.is_main_process:
        print(msg, file=sys.stderr, flush=True)


class _OverBudget(RuntimeError):
    """The process's resident memory passed the memory limit during a step (CPU budgets)."""


def halve_micro_batch(micro_batch: int, accum: int) -> tuple[int, int]:
    """The next smaller micro-batch (the largest divisor of ``micro_batch`` up to half of it) and the accumulation
    that keeps the effective batch: 8x1 -> 4x2, 6x2 -> 3x4, 3x4 -> 1x12."""
    new = max(d for d in range(1, micro_batch // 2 + 1) if micro_batch % d == 0)
    return new, accum * (micro_batch // new)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError, _OverBudget)) or \
        (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trim_heap()


@dataclass
class BatchShape:
    """The micro-batch and accumulation the loop runs at. An out-of-memory back-off halves the micro-batch and
    doubles accumulation, so a step still sees the same sequences; the history goes into checkpoints and the
    summary, and a resumed run keeps the lowered shape."""
    micro_batch: int
    accum: int
    eval_batch: int
    history: list[dict] = field(default_factory=list)

    @classmethod
    def for_run(cls, recipe: Recipe, state: dict | None) -> BatchShape:
        saved = (state or {}).get("backoff")
        if saved:
            return cls(saved["micro_batch_size"], saved["grad_accum_steps"], recipe.micro_batch_size,
                       saved.get("history", []))
        return cls(recipe.micro_batch_size, recipe.grad_accum_steps, recipe.micro_batch_size)

    def back_off(self, step: int, exc: BaseException) -> None:
        self.micro_batch, self.accum = halve_micro_batch(self.micro_batch, self.accum)
        self.eval_batch = min(self.eval_batch, self.micro_batch)
        self.history.append({"step": step, "micro_batch_size": self.micro_batch, "grad_accum_steps": self.accum,
                             "reason": f"{type(exc).__name__}: {str(exc)[:160]}"})

    def state(self) -> dict:
        return {"backoff": {"micro_batch_size": self.micro_batch, "grad_accum_steps": self.accum,
                            "history": self.history}} if self.history else {}


class TimeBudget:
    """``fit(time_limit_s=...)``: how many steps fit (the LR schedule's horizon), and when to stop.

    The first plan comes from the planner's predicted throughput, which can be off by 2x, so the plan is redone
    from the measured mean step after a few steps, then more and more rarely: each re-plan moves where the LR
    schedule ends, so it should settle early.
    """
    REPLAN_AFTER = (2, 5, 20, 50, 200, 1000)  # steps into this session
    RESERVE_S = 10.0  # the final checkpoint, save and summary
    STOP_MARGIN_S = 5.0

    def __init__(self, limit_s: float, t_start: float, closing_eval_s: float):
        self.limit_s, self.t_start, self.closing_eval_s = limit_s, t_start, closing_eval_s

    def seconds_left(self) -> float:
        return self.limit_s - (time.perf_counter() - self.t_start) - self.closing_eval_s - self.RESERVE_S

    def replan(self, steps_done_here: int) -> bool:
        return steps_done_here in self.REPLAN_AFTER

    def must_stop(self, mean_step_s: float) -> bool:
        """Would one more step, and the closing evaluation, pass the limit?"""
        elapsed = time.perf_counter() - self.t_start
        return elapsed + mean_step_s + self.closing_eval_s + self.STOP_MARGIN_S > self.limit_s


class _Training:
    """One ``fit`` call after model and data are loaded: the state the loop shares (model, optimizer, position,
    batch shape, horizon) lives here as attributes, and each phase is a method, so ``fit`` reads top to bottom."""

    def __init__(self, recipe: Recipe, net, source: ModelSource, tokenizer, packed: PackedData, accelerator,
                 run_dir: Path, t_start: float, time_limit_s: float | None, memory_limit_bytes: int | None,
                 teacher_model=None):
        self.recipe, self.source, self.tokenizer, self.packed = recipe, source, tokenizer, packed
        self.accelerator, self.run_dir, self.t_start = accelerator, run_dir, t_start
        self.time_limit_s, self.memory_limit_bytes = time_limit_s, memory_limit_bytes
        self.rank, self.world, self.device = accelerator.process_index, accelerator.num_processes, accelerator.device
        self.bit = recipe.method == "bitnet"

        self.trainable, self.total = count_parameters(net)
        frozen_mm, trainable_mm = matmul_flops(net)
        cfg = net.config
        n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
        self.flops_tok = train_flops_per_token(frozen_mm, trainable_mm, n_layers, hidden, recipe.seq_len)
        self.teacher: Teacher | None = None
        if teacher_model is not None:
            self.teacher = Teacher(teacher_model, recipe.distill_weight, recipe.distill_temperature,
                                   fused_head(teacher_model) if recipe.fused_cross_entropy else None)
            self.flops_tok += forward_flops_per_token(sum(matmul_flops(teacher_model)), n_layers, hidden,
                                                      recipe.seq_len)
        # MFU against the matmul ceiling of the dtype the matmuls run in (autocast's compute dtype; fp32 otherwise):
        # bf16 matmuls run ~2.2x fp32's rate on an AVX512-BF16 CPU, so an fp32 ceiling would overstate bf16 MFU
        self.ceiling, self.ceiling_how = peak_flops(self.device, getattr(torch, recipe.dtype))
        self.tokens_per_step = recipe.effective_batch_size * self.world * recipe.seq_len
        self.say(f"model: {source.name} ({source.kind}), method {recipe.method}: {self.trainable:,} trainable of "
                 f"{self.total:,} parameters ({100 * self.trainable / self.total:.2f}%); effective batch "
                 f"{recipe.micro_batch_size} x {recipe.grad_accum_steps} x {self.world} process(es) = "
                 f"{recipe.effective_batch_size * self.world} sequences = {self.tokens_per_step:,} tokens per step")

        self.sharded = sharding.wanted(recipe, self.world)
        if recipe.fsdp and not self.sharded:
            self.say("fsdp=true in a single process: nothing to shard over, so the model is trained unsharded")
        if self.sharded:
            units = sharding.shard(net, self.device, self.world,
                                   getattr(torch, recipe.dtype) if recipe.dtype != "float32" else None)
            self.say(f"FSDP: weights, gradients and optimizer states sharded over {self.world} processes "
                     f"({units} units: the decoder layers and the rest of the model)")
        self.params = [p for p in net.parameters() if p.requires_grad]
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": recipe.weight_decay},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = make_optimizer(groups, recipe, self.device)
        # the schedule's horizon: recipe.max_steps, or under a time limit the steps that fit (TimeBudget); the
        # lambda reads self.horizon at every step, so a re-plan reshapes the rest of the schedule
        self.horizon = recipe.max_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(
            s, base_lr=1.0, warmup_steps=min(recipe.warmup_steps, max(1, self.horizon // 2)),
            max_steps=self.horizon, min_lr_ratio=recipe.min_lr_ratio))
        net.train()
        if self.sharded:
            # the model is already sharded (no DDP wrapper); the LM head's weight is a shard outside the model's
            # own forward, so the loss runs through the full forward instead of the fused head
            self.net, self.optimizer = net, accelerator.prepare(optimizer)
            self.unwrapped, self.head = net, None
        else:
            self.net, self.optimizer = accelerator.prepare(net, optimizer)
            self.unwrapped = accelerator.unwrap_model(self.net)
            self.head = fused_head(self.unwrapped) if recipe.fused_cross_entropy else None

        self.step, self.train_seconds, self.train_tokens = 0, 0.0, 0
        self.val_before: float | None = None
        self.shape = BatchShape.for_run(recipe, None)
        self.budget: TimeBudget | None = None
        self.stopped_for_time = False
        self.resumed = False

    def say(self, msg: str) -> None:
        _print(self.accelerator, msg)

    # ---- phases, in the order fit calls them

    def resume(self) -> None:
        recipe_dict = {**self.recipe.to_dict(), "_data_fingerprint": self.packed.report["fingerprint"]}
        latest, state = ckpt.resume_from(
            self.run_dir, self.unwrapped, self.optimizer, self.scheduler, self.rank,
            check=lambda s: ckpt.check_compatible(s, recipe_dict, self.source.name, self.world), say=self.say)
        self.step, self.train_seconds, self.train_tokens = state["step"], state["train_seconds"], state["train_tokens"]
        self.horizon = state.get("horizon_steps", self.recipe.max_steps)
        self.val_before = state.get("val_loss_before")
        self.shape = BatchShape.for_run(self.recipe, state)
        self.resumed = True
        self.say(f"resumed from {latest} at step {self.step}")
        if self.shape.history:
            self.say(f"resuming with the backed-off micro-batch {self.shape.micro_batch} x accumulation "
                     f"{self.shape.accum}")

    def write_run_files(self) -> None:
        if not self.accelerator.is_main_process:
            return
        atomic_write_json(self.run_dir / RUN_MARKER, {
            "qtrain_run": 1, "model": self.source.name, "model_source": self.source.kind,
            "base_model": self.source.ref, "method": self.recipe.method, "vocab_size": len(self.tokenizer),
            "added_tokens": self.packed.new_token_ids})
        save_recipe(self.recipe, self.run_dir / "recipe.yaml")
        atomic_write_json(self.run_dir / "data_report.json", self.packed.report)

    def open(self) -> None:
        """Validation before training (unless resumed), and under a time limit the first plan of the horizon."""
        t_val = time.perf_counter()
        if self.val_before is None:
            self.val_before = self.validate()
        val_seconds = time.perf_counter() - t_val
        self.say(f"validation loss before: {self.val_before:.4f} (perplexity {math.exp(self.val_before):.2f}) on "
                 f"{int(self.packed.val_ids.numel()):,} tokens")
        if self.time_limit_s is None:
            return
        # the closing evaluation costs what the opening one did (a resumed run skipped it: assume nothing)
        self.budget = TimeBudget(self.time_limit_s, self.t_start, val_seconds)
        if not self.resumed:
            predicted_tps = ASSUMED_MFU * self.ceiling * self.world / self.flops_tok
            # less one more evaluation's time: a margin while the throughput is predicted, not yet measured
            steps = int((self.budget.seconds_left() - val_seconds) * predicted_tps / self.tokens_per_step)
            self.horizon = max(1, min(self.recipe.max_steps, steps))
            self.say(f"time limit {self.time_limit_s:.0f} s: planned {self.horizon} steps from the predicted "
                     f"{predicted_tps:.0f} tokens/s (refined after {TimeBudget.REPLAN_AFTER[0]} steps)")

    def validate(self) -> float:
        if self.bit:  # the model that gets saved: fully ternary, whatever the warmup's strength is now
            from qtrain import bitnet
            bitnet.set_strength(self.unwrapped, 1.0)
        while True:
            try:
                return evaluate(self.net, self.packed.val_ids, self.packed.val_labels, self.shape.eval_batch,
                                self.accelerator, self.head, self.unwrapped, lockstep=self.sharded)
            except Exception as exc:  # noqa: BLE001 - out of memory backs off like training; the rest re-raises
                if not _is_oom(exc) or self.world > 1 or self.shape.eval_batch == 1:
                    raise
                self.shape.eval_batch = halve_micro_batch(self.shape.eval_batch, 1)[0]
                _free_memory(self.device)
                self.say(f"out of memory during validation; validating at micro-batch {self.shape.eval_batch}")

    def train(self) -> None:
        """Steps until the horizon (or the time limit); Ctrl-C or SIGTERM saves a checkpoint and exits 130."""
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.accelerator.is_main_process:
            _truncate_metrics(metrics_path, self.step)
        progress = Progress(self.horizon, self.step, self.accelerator.is_main_process)
        perms: dict[int, torch.Tensor] = {}
        start_step, session_s0 = self.step, self.train_seconds
        old_term = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if _in_main_thread() else None
        interrupted = False
        try:
            with open(metrics_path, "a") if self.accelerator.is_main_process else contextlib.nullcontext() as mfile:
                while self.step < self.horizon:
                    t0 = time.perf_counter()
                    strength = self._set_bitnet_strength()
                    done = self._optimizer_step(perms)
                    if done is None:  # backed off after running out of memory: the same step again
                        continue
                    mean_loss, grad_norm = done
                    self.step += 1
                    dt = time.perf_counter() - t0
                    self.train_seconds += dt
                    self.train_tokens += self.tokens_per_step
                    self._log_step(mfile, progress, mean_loss, grad_norm, dt, strength)
                    self._periodic(mfile)
                    mean_step = (self.train_seconds - session_s0) / max(1, self.step - start_step)
                    if self._out_of_time(progress, self.step - start_step, mean_step):
                        self.stopped_for_time = True
                        self.say(f"time limit {self.time_limit_s:.0f} s: stopping after step {self.step} "
                                 f"(mean step {mean_step:.1f} s)")
                        break
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
        if interrupted:
            self.save(self.step, collective=False)
            self.say(f"interrupted: checkpoint saved at step {self.step} in {self.run_dir}; continue with --resume")
            raise SystemExit(130)

    def finish(self, heap_bounded: bool, extra_summary: dict[str, Any] | None) -> dict[str, Any]:
        """The last checkpoint, validation after, the final save and summary.json."""
        self.save(self.step)
        val_after = self.validate()
        peak = peak_memory_bytes(self.device)
        if self.world > 1:
            peak = int(self.accelerator.reduce(torch.tensor([peak], device=self.device), reduction="max").item())
        summary = self._summary(val_after, peak, heap_bounded, extra_summary)
        whole = sharding.full_state_dict(self.unwrapped) if self.sharded else None  # every process gathers
        if self.accelerator.is_main_process:
            save_final(self.unwrapped, self.tokenizer, self.run_dir, self.recipe, state_dict=whole)
            atomic_write_json(self.run_dir / "summary.json", summary)
            self.say(f"done: {self.step} steps, {self.train_tokens:,} tokens at {summary['tokens_per_second']:.1f} "
                     f"tokens/s (MFU {summary['mfu']:.1%}), validation perplexity "
                     f"{summary['val_perplexity_before']:.2f} -> {summary['val_perplexity_after']:.2f}, peak memory "
                     f"{peak / 2**30:.2f} GiB; saved in {self.run_dir}")
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return summary

    # ---- one step and what follows it

    def _set_bitnet_strength(self) -> float | None:
        if not self.bit:
            return None
        from qtrain import bitnet
        strength = bitnet.strength_at(self.step, self.recipe.bitnet_warmup_steps, self.horizon)
        bitnet.set_strength(self.unwrapped, strength)
        return strength

    def _optimizer_step(self, perms: dict[int, torch.Tensor]) -> tuple[float, float | None] | None:
        """Forward and backward over the step's micro-batches, then the update: (mean loss, grad norm). Out of
        memory drops the partial gradients, backs off the batch shape and returns None (run the step again); at
        micro-batch 1 it saves a checkpoint and stops with the knobs that need less memory."""
        accel, shape, device = self.accelerator, self.shape, self.device
        batches = []
        for micro in range(shape.accum):
            idx = sample_indices(self.step, micro, self.rank, self.world, shape.micro_batch, shape.accum,
                                 len(self.packed.train_ids), self.recipe.seed, perms)
            batches.append((self.packed.train_ids[idx], self.packed.train_labels[idx]))
        window = torch.tensor([sum(count_target_tokens(y) for _, y in batches)], device=device)
        window_global = int(accel.reduce(window, reduction="sum").item()) if self.world > 1 else int(window)
        scale = loss_scale(window_global, self.world)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        try:
            for micro, (x, y) in enumerate(batches):
                last = micro == shape.accum - 1
                if self.sharded:  # reduce-scatter gradients on the last micro-batch only, as DDP's no_sync does
                    self.net.set_requires_gradient_sync(last)
                with contextlib.nullcontext() if last or self.world == 1 or self.sharded else accel.no_sync(self.net):
                    loss = forward_loss_sum(self.net, self.unwrapped, x.to(device), y.to(device), self.head,
                                            self.teacher)
                    accel.backward(loss * scale)
                loss_sum += loss.detach().double()
                del loss
                self._check_resident_memory()
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raises
            if not _is_oom(exc) or self.world > 1:
                raise
            loss = batches = None  # noqa: F841 - the step's activations go before the caches are emptied
            self._back_off(exc)
            return None
        grad_norm = None
        if self.recipe.max_grad_norm > 0:
            norm = accel.clip_grad_norm_(self.params, self.recipe.max_grad_norm)
            grad_norm = float(norm.full_tensor() if sharding.is_sharded(norm) else norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            loss_sum = accel.reduce(loss_sum, reduction="sum")
        return float(loss_sum) / max(1, window_global), grad_norm

    def _check_resident_memory(self) -> None:
        limit = self.memory_limit_bytes
        if limit and self.device.type == "cpu" and current_rss_bytes() > limit:
            raise _OverBudget(f"resident memory {current_rss_bytes() / 2**30:.2f} GiB is over the limit of "
                              f"{limit / 2**30:.2f} GiB")

    def _back_off(self, exc: BaseException) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        _free_memory(self.device)
        if self.shape.micro_batch == 1:
            self.save(self.step, collective=False)
            raise RunError(f"out of memory at step {self.step + 1} with micro-batch 1 ({exc}); a checkpoint is saved "
                           f"in {self.run_dir}. Lower seq_len, set gradient_checkpointing=true, use method=qlora or a "
                           "smaller model, or give a larger budget; then --resume") from None
        self.shape.back_off(self.step + 1, exc)
        self.say(f"out of memory at step {self.step + 1} ({type(exc).__name__}); backing off to micro-batch "
                 f"{self.shape.micro_batch} x accumulation {self.shape.accum} (same effective batch) and running the "
                 "step again")

    def _log_step(self, mfile, progress: Progress, mean_loss: float, grad_norm: float | None, dt: float,
                  strength: float | None) -> None:
        peak = peak_memory_bytes(self.device)
        tps = tokens_per_second(self.tokens_per_step, dt)
        if self.accelerator.is_main_process:
            mfile.write(json.dumps({"step": self.step, "loss": round(mean_loss, 5),
                                    "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                    "tokens": self.train_tokens, "tokens_per_second": round(tps, 2),
                                    "step_seconds": round(dt, 4), "peak_memory_bytes": peak,
                                    **({"bitnet_strength": strength} if self.bit else {})}) + "\n")
            mfile.flush()
        progress.update(self.step, f"loss {mean_loss:.4f}  {tps:6.1f} tok/s  peak {peak / 2**30:.2f} GiB",
                        self.recipe.log_every)

    def _periodic(self, mfile) -> None:
        """Validation and checkpoints every eval_every / save_every steps (the last step has its own)."""
        if self.step >= self.horizon:
            return
        if self.recipe.eval_every and self.step % self.recipe.eval_every == 0:
            vl = self.validate()
            self.say(f"step {self.step}: validation loss {vl:.4f} (perplexity {math.exp(vl):.2f})")
            if self.accelerator.is_main_process:
                mfile.write(json.dumps({"step": self.step, "val_loss": vl}) + "\n")
        if self.recipe.save_every and self.step % self.recipe.save_every == 0:
            self.save(self.step)

    def _out_of_time(self, progress: Progress, steps_here: int, mean_step: float) -> bool:
        if self.budget is None or self.step >= self.horizon:
            return False
        if self.budget.replan(steps_here):
            self.horizon = max(self.step, min(self.recipe.max_steps,
                                              self.step + int(self.budget.seconds_left() / mean_step)))
            progress.set_total(self.horizon)
            self.say(f"measured {mean_step:.2f} s/step: {self.horizon} steps fit the time limit")
        stop = self.budget.must_stop(mean_step)
        if self.world > 1:  # every process stops at the same step
            flag = torch.tensor([int(stop)], device=self.device)
            stop = bool(self.accelerator.reduce(flag, reduction="max").item())
        return stop

    def save(self, at_step: int, collective: bool = True) -> None:
        # every rank's RNG (dropout) goes into the checkpoint, so a resumed run draws the same masks; after
        # Ctrl-C the other processes may be gone, so only this process's state is saved then
        if self.sharded and not collective:
            # each process holds only its shards, and the others may be gone: the last complete checkpoint stands
            self.say(f"a sharded run saves checkpoints only with every process; step {at_step} is not saved")
            return
        if self.world > 1 and collective:
            from accelerate.utils import gather_object
            rngs = dict(enumerate(gather_object([ckpt.get_rng_state()])))
        else:
            rngs = {0: ckpt.get_rng_state()}
        state = {"model": self.source.name, "world_size": self.world, "recipe": self.recipe.to_dict(),
                 "data_fingerprint": self.packed.report["fingerprint"], "train_seconds": self.train_seconds,
                 "train_tokens": self.train_tokens, "horizon_steps": self.horizon,
                 "val_loss_before": self.val_before, "sharded": self.sharded, **self.shape.state()}
        if self.sharded:
            self._save_sharded(at_step, state, rngs)
        elif self.accelerator.is_main_process:
            ckpt.save_checkpoint(self.run_dir, at_step, self.unwrapped, self.optimizer, self.scheduler, state, rngs)
        if collective:
            self.accelerator.wait_for_everyone()

    def _save_sharded(self, at_step: int, state: dict[str, Any], rngs: dict[int, dict]) -> None:
        """Every process writes its shards into the main process's temporary directory; the main process then
        completes and renames it (so a crash midway leaves the previous checkpoint as it was)."""
        from accelerate.utils import broadcast_object_list

        holder = [str(ckpt.begin_checkpoint(self.run_dir, at_step)) if self.accelerator.is_main_process else None]
        tmp = Path(broadcast_object_list(holder, from_process=0)[0])
        ckpt.write_model_files(tmp, self.unwrapped, self.optimizer, rank=self.rank)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            ckpt.finish_checkpoint(self.run_dir, at_step, tmp, self.scheduler, state, rngs)

    def _summary(self, val_after: float, peak: int, heap_bounded: bool,
                 extra: dict[str, Any] | None) -> dict[str, Any]:
        recipe, rep = self.recipe, self.packed.report
        tps = tokens_per_second(self.train_tokens, self.train_seconds)
        return {
            "method": recipe.method, "recipe": recipe.name, "model": self.source.name, "steps": self.step,
            "train_tokens": self.train_tokens, "tokens_per_second": round(tps, 2),
            "mfu": round(mfu(tps / self.world, self.flops_tok, self.ceiling), 4), "peak_memory_bytes": peak,
            "cuda_memory": cuda_memory_detail(self.device),
            "wall_seconds": round(time.perf_counter() - self.t_start, 2), "train_seconds": round(self.train_seconds, 2),
            "val_loss_before": round(self.val_before, 5), "val_loss_after": round(val_after, 5),
            "val_perplexity_before": round(math.exp(self.val_before), 4),
            "val_perplexity_after": round(math.exp(val_after), 4),
            "val_tokens": int(self.packed.val_ids.numel()), "trainable_params": self.trainable,
            "total_params": self.total, "flops_per_token": self.flops_tok, "peak_flops": self.ceiling,
            "peak_flops_source": self.ceiling_how, "malloc_mmap_threshold_fixed": heap_bounded,
            "allocator": heap_allocator(), "max_steps": recipe.max_steps, "planned_steps": self.horizon,
            "stopped_for_time": self.stopped_for_time, "time_limit_seconds": self.time_limit_s,
            "memory_limit_bytes": self.memory_limit_bytes, "backoffs": self.shape.history,
            "micro_batch_size_final": self.shape.micro_batch, "grad_accum_steps_final": self.shape.accum,
            "world_size": self.world, "device": str(self.device), "machine": machine_info(), "versions": _versions(),
            "mixed_precision": self.accelerator.mixed_precision, "sharded": self.sharded,
            # with a teacher the logged training loss is the distillation objective; validation is cross-entropy
            "distill": ({"weight": recipe.distill_weight, "temperature": recipe.distill_temperature,
                         "teacher_dtype": recipe.distill_teacher_dtype} if self.teacher else None),
            "data": {k: rep[k] for k in ("source", "format", "instruction_template", "kept", "dropped",
                                         "train_sequences", "val_sequences") if k in rep},
            **(extra or {}),
        }


def _fresh_precision_state(recipe: Recipe) -> str:
    """The recipe's accelerate mixed-precision mode, with accelerate's process-wide state made ready for it.
    AcceleratorState is a singleton that refuses a second Accelerator with another mode ("restart your runtime"),
    which would break a second ``fit`` in one process (a notebook, a benchmark) whose recipe changes ``dtype``.
    Only that state is cleared, through accelerate's own (underscored) reset that its tests use; the
    PartialState holding the process group stays."""
    from accelerate.state import AcceleratorState

    mode = mixed_precision(recipe)
    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mode)) != mode:
        AcceleratorState._reset_state(reset_partial_state=False)
    return mode


def fit(recipe: Recipe, *, model: str | None = None, data: str | None = None, output: str | Path,
        resume: bool = False, overwrite: bool = False, skip_bad_lines: bool = False,
        extra_summary: dict[str, Any] | None = None, time_limit_s: float | None = None,
        memory_limit_bytes: int | None = None) -> dict[str, Any]:
    """Train ``recipe`` on ``data`` starting from ``model``; write the run to ``output``; return the summary.

    ``time_limit_s`` bounds the wall time of this call: after each step the run stops cleanly (checkpoint and
    summary) if another step, at the mean step time so far, would pass the limit, leaving room for the final
    evaluation and save.

    Out of memory during a step (CUDA OOM, ``MemoryError``, or on a CPU resident memory above
    ``memory_limit_bytes`` after a micro-step) backs off: the step's partial gradients are dropped, the micro-batch
    halves and accumulation doubles (same sequences per step, same effective batch), and the same step runs
    again; nothing trained before is lost. At micro-batch 1 there is nothing left to halve and the run stops with
    a checkpoint and a message naming the knobs that need less memory.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t_start = time.perf_counter()
    heap_bounded = bound_heap_retention()  # peak RSS then follows live memory (see measure.py)
    # cpu=True without a GPU: that is what makes accelerate set up gloo (MULTI_CPU) under a multi-process
    # launcher; without it each process would train alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_fresh_precision_state(recipe))
    run_dir = Path(output)
    prepare_output_dir(run_dir, resume, overwrite, check_only=True)
    set_seed(recipe.seed)
    slow = slow_precision_warning(recipe, accelerator.device)
    if slow:
        _print(accelerator, slow)

    source: ModelSource = resolve_model_source(model)
    tokenizer = load_tokenizer(source)
    packed = build_data(data, recipe, tokenizer, skip_bad_lines)
    rep = packed.report
    _print(accelerator, f"data: {rep['source']} ({rep['format']}): {rep['files_seen']} read, {rep['kept']} kept, "
                        f"{rep['dropped_total']} dropped {rep['dropped']}; {rep['train_docs']} train / {rep['val_docs']} "
                        f"val documents -> {rep['train_sequences']} x {recipe.seq_len} training tokens, "
                        f"{rep['val_sequences']} validation sequences")
    net, teacher = _load_prepared_model(recipe, source, tokenizer, packed, accelerator, fresh=not resume)
    if accelerator.is_main_process:  # model and data loaded fine: only now may --overwrite clear the old run
        prepare_output_dir(run_dir, resume, overwrite)
    accelerator.wait_for_everyone()

    run = _Training(recipe, net, source, tokenizer, packed, accelerator, run_dir, t_start, time_limit_s,
                    memory_limit_bytes, teacher)
    if resume:
        run.resume()
    run.write_run_files()
    run.open()
    run.train()
    return run.finish(heap_bounded, extra_summary)


def slow_precision_warning(recipe: Recipe, device: torch.device) -> str | None:
    """A warning when the recipe's compute dtype has no fast matmuls on this device: bf16 on an x86 CPU without
    AVX512-BF16/AMX, where oneDNN emulates it (measure.cpu_has_native_bf16)."""
    from qtrain.measure import cpu_has_native_bf16

    if device.type != "cpu" or recipe.dtype != "bfloat16" or cpu_has_native_bf16() is not False:
        return None
    return ("warning: dtype=bfloat16 on a CPU without native bf16 (no AVX512-BF16 or AMX): its matmuls are emulated, "
            "about 100x slower than fp32 on an AVX2 CPU; train with dtype=float32 (what qtrain plan and fit --budget "
            "pick on a CPU)")


def mixed_precision(recipe: Recipe) -> str:
    """accelerate's mixed_precision for the recipe's compute dtype: bf16 or fp16 autocast over fp32 master
    weights where weights train, and for fp16 dynamic loss scaling (accelerate's GradScaler), which needs CUDA."""
    if recipe.dtype == "float16" and not torch.cuda.is_available():
        raise RecipeError("dtype=float16 trains with loss scaling, which needs a CUDA device; on this machine use "
                          "dtype=bfloat16 or float32")
    return {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[recipe.dtype]


def weights_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype the model's weights are held in. Weights that train stay fp32 (the master copy: AdamW's small
    updates to bf16 weights round away; at lr 1e-5 most of them do) and autocast computes in recipe.dtype;
    frozen base weights under LoRA/QLoRA are held in recipe.dtype, which is where it saves memory."""
    if recipe.method in ("full", "bitnet"):
        return torch.float32
    return getattr(torch, recipe.dtype)


def _load_prepared_model(recipe: Recipe, source: ModelSource, tokenizer, packed: PackedData, accelerator,
                         fresh: bool = True):
    """The base model in the recipe's dtype (and quantization), with FIM tokens added and the method applied;
    and the distillation teacher (a frozen copy from before the method was applied), or None. ``fresh``: a new
    run, not a resumed one (a resumed run loads its trained weights, so a BitNet start is not computed)."""
    from qtrain import bitnet
    from qtrain.models import load_config

    device = accelerator.device
    ternary = source.kind in ("local", "hub") and bitnet.is_bitnet_config(load_config(source))
    if ternary and recipe.method not in ("bitnet", "lora"):
        raise RecipeError(f"{source.name} is a ternary (BitNet b1.58) checkpoint: fine-tune it with method=bitnet "
                          "(ternary QAT: its shadow weights train and are packed again) or method=lora (adapters on "
                          f"the frozen ternary base); method={recipe.method} cannot train it")
    qconf = quantization_config(recipe, device.type)
    net = load_model(source, dtype=weights_dtype(recipe),
                     **({"quantization_config": qconf, "device_map": {"": str(device)}} if qconf is not None else {}))
    if ternary:
        names = bitnet.from_packed(net)
        net.to(dtype=weights_dtype(recipe))
        _print(accelerator, f"{source.name}: {len(names)} packed ternary layers unpacked to shadow weights that "
                            "reproduce their ternary values and scales")
    if packed.new_token_ids:
        net.resize_token_embeddings(len(tokenizer))
        _print(accelerator, f"added FIM tokens {packed.new_token_ids} to the tokenizer and resized the embeddings")
    teacher = None
    if recipe.distill_weight > 0:
        if ternary and recipe.distill_teacher_dtype in ("int8", "nf4"):
            raise RecipeError(f"distill_teacher_dtype={recipe.distill_teacher_dtype} quantises a full-precision "
                              f"teacher, but {source.name} is already ternary: use distill_teacher_dtype=float32 "
                              "or bfloat16")
        teacher = build_teacher(net, recipe.distill_teacher_dtype, device)
        _print(accelerator, f"distillation: teacher is the model before training ({recipe.distill_teacher_dtype}), "
                            f"weight {recipe.distill_weight:g}, temperature {recipe.distill_temperature:g}")
    net = prepare_model(net, recipe, packed.new_token_ids)
    if recipe.method == "bitnet" and recipe.bitnet_start == "gptq" and fresh and not ternary:
        _gptq_start(net, packed, recipe, accelerator)
    return net, teacher


def build_teacher(net: torch.nn.Module, dtype: str, device: torch.device) -> torch.nn.Module:
    """A frozen copy of ``net`` as it is now (the distillation teacher), in ``dtype``: a float dtype, or int8 /
    nf4 linear layers (methods.quantize_frozen_linears) around fp32 embeddings and head (bf16 on CUDA)."""
    import copy

    from qtrain.methods import quantize_frozen_linears

    quantized = dtype in ("int8", "nf4")
    float_dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if quantized else getattr(torch, dtype)
    teacher = copy.deepcopy(net).to(dtype=float_dtype)
    if quantized:
        quantize_frozen_linears(teacher, dtype, device)
    teacher = teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def _gptq_start(net, packed: PackedData, recipe: Recipe, accelerator) -> None:
    """The error-compensating ternary start (qtrain/bitnet_gptq.py) on the first training sequences; every
    process computes the same one from the same data."""
    from qtrain.bitnet_gptq import gptq_start

    calib = packed.train_ids[: recipe.bitnet_calib_sequences].to(accelerator.device)
    _print(accelerator, f"bitnet start: GPTQ onto the ternary grid, calibrated on {calib.numel():,} training tokens")
    report = gptq_start(net, calib, progress=lambda line: log.info(line))
    _print(accelerator, f"bitnet start: {report['layers']} layers in {report['seconds']:.0f} s; output error "
                        f"{report['output_error_vs_absmean']:.2f}x that of absmean rounding on the calibration inputs")


def make_optimizer(groups, recipe: Recipe, device: torch.device):
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    import bitsandbytes as bnb

    if recipe.optimizer == "adamw_8bit":
        return bnb.optim.AdamW8bit(groups, lr=recipe.learning_rate)
    if device.type != "cuda":
        raise RecipeError("optimizer 'paged_adamw_8bit' pages optimizer state between GPU and CPU memory and needs a "
                          "CUDA device; use optimizer=adamw or adamw_8bit on this device")
    return bnb.optim.PagedAdamW8bit(groups, lr=recipe.learning_rate)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint (the interrupted run's lost steps are redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    from qtrain.io import atomic_write_text
    atomic_write_text(path, "".join(x + "\n" for x in keep))


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
