"""The one training loop: setup -> model -> data -> optimizer -> loop -> checkpoint -> final save.

Runs unchanged under ``accelerate launch --num_processes N``: every process computes the same packed
dataset, takes its own slice of each optimizer step's samples, and gradients are averaged by DDP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qtrain import checkpoint as ckpt
from qtrain.data.corpus import load_corpus
from qtrain.data.pack import IGNORE, ensure_fim_tokens, pack, tokenize_documents
from qtrain.io import atomic_write_json, make_tmp_dir
from qtrain.loss import forward_loss_sum, fused_head
from qtrain.measure import (bound_heap_retention, current_rss_bytes, heap_allocator, lr_at, machine_info,
                            matmul_flops, mfu, peak_flops, peak_memory_bytes, tokens_per_second,
                            train_flops_per_token, trim_heap)
from qtrain.methods import count_parameters, prepare_model, quantization_config
from qtrain.models import ModelSource, load_model, load_tokenizer, resolve_model_source
from qtrain.plan import ASSUMED_MFU
from qtrain.recipe import Recipe, save_recipe
from qtrain.runs import RUN_MARKER, is_run_dir
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
    va_ids, va_lab, _ = pack(val_ex, recipe.seq_len, allow_short=True)
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
             unwrapped=None) -> float:
    """Mean next-token loss over the validation sequences, shared across processes."""
    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for start in range(rank * micro_batch, len(ids), world * micro_batch):
        x = ids[start:start + micro_batch].to(accelerator.device)
        y = labels[start:start + micro_batch].to(accelerator.device)
        total[0] += forward_loss_sum(model, unwrapped or model, x, y, head).double()
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


def _move_into(tmp: Path, run_dir: Path) -> None:
    for p in sorted(tmp.iterdir()):
        os.replace(p, run_dir / p.name)
    tmp.rmdir()


def save_final(model, tokenizer, run_dir: Path, recipe: Recipe) -> None:
    """Save the trained model in Hugging Face format: a PEFT adapter, the full model, or (bitnet) the packed
    ternary model that transformers' BitNet support loads."""
    tmp = make_tmp_dir(run_dir / "final")
    try:
        if recipe.method == "bitnet":
            from qtrain import bitnet

            bitnet.save_packed(model, tokenizer, tmp, recipe.bitnet_rms_norm,
                               getattr(model.config, "rms_norm_eps", 1e-6), getattr(model, "_qtrain_bitnet_kept", []))
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        _move_into(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    run_dir = Path(output)
    prepare_output_dir(run_dir, resume, overwrite, check_only=True)
    set_seed(recipe.seed)

    # ---- model source, tokenizer, data
    source: ModelSource = resolve_model_source(model)
    tokenizer = load_tokenizer(source)
    packed = build_data(data, recipe, tokenizer, skip_bad_lines)
    rep = packed.report
    _print(accelerator, f"data: {rep['source']} ({rep['format']}): {rep['files_seen']} read, {rep['kept']} kept, "
                        f"{rep['dropped_total']} dropped {rep['dropped']}; {rep['train_docs']} train / {rep['val_docs']} "
                        f"val documents -> {rep['train_sequences']} x {recipe.seq_len} training tokens, "
                        f"{rep['val_sequences']} validation sequences")

    # ---- model and method
    dtype = getattr(torch, recipe.dtype)
    qconf = quantization_config(recipe, device.type)
    net = load_model(source, dtype=dtype, **({"quantization_config": qconf, "device_map": {"": str(device)}}
                                             if qconf is not None else {}))
    if packed.new_token_ids:
        net.resize_token_embeddings(len(tokenizer))
        _print(accelerator, f"added FIM tokens {packed.new_token_ids} to the tokenizer and resized the embeddings")
    net = prepare_model(net, recipe, packed.new_token_ids)
    if accelerator.is_main_process:
        prepare_output_dir(run_dir, resume, overwrite)
    accelerator.wait_for_everyone()
    trainable, total = count_parameters(net)
    frozen_mm, trainable_mm = matmul_flops(net)
    cfg = net.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    flops_tok = train_flops_per_token(frozen_mm, trainable_mm, n_layers, hidden, recipe.seq_len)
    ceiling, ceiling_how = peak_flops(device)
    _print(accelerator, f"model: {source.name} ({source.kind}), method {recipe.method}: {trainable:,} trainable of "
                        f"{total:,} parameters ({100 * trainable / total:.2f}%); effective batch "
                        f"{recipe.micro_batch_size} x {recipe.grad_accum_steps} x {world} process(es) = "
                        f"{recipe.effective_batch_size * world} sequences = "
                        f"{recipe.effective_batch_size * world * recipe.seq_len:,} tokens per step")

    # ---- optimizer and schedule
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = make_optimizer(groups, recipe, device)
    # the schedule's horizon: recipe.max_steps, or, under a time limit, the steps that fit in it (planned
    # from the predicted throughput, then refined from the measured one after two steps)
    horizon = {"steps": recipe.max_steps}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(
        s, base_lr=1.0, warmup_steps=min(recipe.warmup_steps, max(1, horizon["steps"] // 2)),
        max_steps=horizon["steps"], min_lr_ratio=recipe.min_lr_ratio))
    net.train()
    net, optimizer = accelerator.prepare(net, optimizer)
    unwrapped = accelerator.unwrap_model(net)
    head = fused_head(unwrapped) if recipe.fused_cross_entropy else None

    bit = recipe.method == "bitnet"

    eval_batch = [recipe.micro_batch_size]

    def validate() -> float:
        if bit:  # the model that gets saved: fully ternary, whatever the warmup's strength is now
            from qtrain import bitnet
            bitnet.set_strength(unwrapped, 1.0)
        while True:
            try:
                return evaluate(net, packed.val_ids, packed.val_labels, eval_batch[0], accelerator, head, unwrapped)
            except Exception as exc:  # noqa: BLE001 - out of memory backs off like training; the rest re-raises
                if not _is_oom(exc) or world > 1 or eval_batch[0] == 1:
                    raise
                eval_batch[0] = halve_micro_batch(eval_batch[0], 1)[0]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                trim_heap()
                _print(accelerator, f"out of memory during validation; validating at micro-batch {eval_batch[0]}")

    # ---- resume
    recipe_dict = {**recipe.to_dict(), "_data_fingerprint": rep["fingerprint"]}
    step, train_seconds, train_tokens, val_before = 0, 0.0, 0, None
    if resume:
        latest, state = ckpt.resume_from(
            run_dir, unwrapped, optimizer, scheduler, rank,
            check=lambda s: ckpt.check_compatible(s, recipe_dict, source.name, world),
            say=lambda m: _print(accelerator, m))
        step, train_seconds, train_tokens = state["step"], state["train_seconds"], state["train_tokens"]
        horizon["steps"] = state.get("horizon_steps", recipe.max_steps)
        val_before = state.get("val_loss_before")
        _print(accelerator, f"resumed from {latest} at step {step}")
    if accelerator.is_main_process:
        atomic_write_json(run_dir / RUN_MARKER, {"qtrain_run": 1, "model": source.name, "model_source": source.kind,
                                                "base_model": source.ref, "method": recipe.method,
                                                "vocab_size": len(tokenizer),
                                                "added_tokens": packed.new_token_ids})
        save_recipe(recipe, run_dir / "recipe.yaml")
        atomic_write_json(run_dir / "data_report.json", rep)

    micro_batch, accum = recipe.micro_batch_size, recipe.grad_accum_steps  # lowered by an out-of-memory back-off
    backoffs: list[dict] = []
    if resume and state.get("backoff"):
        micro_batch, accum = state["backoff"]["micro_batch_size"], state["backoff"]["grad_accum_steps"]
        backoffs = state["backoff"].get("history", [])
        _print(accelerator, f"resuming with the backed-off micro-batch {micro_batch} x accumulation {accum}")
    start_step, session_train_s0 = step, train_seconds
    t_val = time.perf_counter()
    if val_before is None:
        val_before = validate()
    val_seconds = time.perf_counter() - t_val
    _print(accelerator, f"validation loss before: {val_before:.4f} (perplexity {math.exp(val_before):.2f}) on "
                        f"{int(packed.val_ids.numel()):,} tokens")
    tokens_per_step = recipe.effective_batch_size * world * recipe.seq_len
    if time_limit_s is not None and not resume:
        predicted_tps = ASSUMED_MFU * ceiling * world / flops_tok
        left = time_limit_s - (time.perf_counter() - t_start) - 2 * val_seconds - 10
        horizon["steps"] = max(1, min(recipe.max_steps, int(left * predicted_tps / tokens_per_step)))
        _print(accelerator, f"time limit {time_limit_s:.0f} s: planned {horizon['steps']} steps from the predicted "
                            f"{predicted_tps:.0f} tokens/s (refined after 2 steps)")

    # ---- loop
    metrics_path = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        _truncate_metrics(metrics_path, step)
    progress = Progress(horizon["steps"], step, accelerator.is_main_process)
    perms: dict[int, torch.Tensor] = {}
    n_seq = len(packed.train_ids)
    interrupted = False
    stopped_for_time = False
    final_eval_s = 0.0
    old_term = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if _in_main_thread() else None
    state_common = {"model": source.name, "world_size": world, "recipe": recipe.to_dict(),
                    "data_fingerprint": rep["fingerprint"]}

    def save(at_step: int, collective: bool = True) -> None:
        # every rank's RNG (dropout) goes into the checkpoint, so a resumed run draws the same masks; after
        # Ctrl-C the other processes may be gone, so only this process's state is saved then
        if world > 1 and collective:
            from accelerate.utils import gather_object
            rngs = dict(enumerate(gather_object([ckpt.get_rng_state()])))
        else:
            rngs = {0: ckpt.get_rng_state()}
        if accelerator.is_main_process:
            ckpt.save_checkpoint(run_dir, at_step, unwrapped, optimizer, scheduler,
                                 {**state_common, "train_seconds": train_seconds, "train_tokens": train_tokens,
                                  "horizon_steps": horizon["steps"],
                                  "val_loss_before": val_before,
                                  **({"backoff": {"micro_batch_size": micro_batch, "grad_accum_steps": accum,
                                                  "history": backoffs}} if backoffs else {})}, rngs)
        if collective:
            accelerator.wait_for_everyone()

    try:
        with open(metrics_path, "a") if accelerator.is_main_process else contextlib.nullcontext() as mfile:
            while step < horizon["steps"]:
                t0 = time.perf_counter()
                if bit:
                    from qtrain import bitnet
                    strength = bitnet.strength_at(step, recipe.bitnet_warmup_steps, horizon["steps"])
                    bitnet.set_strength(unwrapped, strength)
                batches = []
                for micro in range(accum):
                    idx = sample_indices(step, micro, rank, world, micro_batch, accum, n_seq, recipe.seed, perms)
                    batches.append((packed.train_ids[idx], packed.train_labels[idx]))
                window = torch.tensor([sum(count_target_tokens(y) for _, y in batches)], device=device)
                window_global = int(accelerator.reduce(window, reduction="sum").item()) if world > 1 else int(window)
                scale = loss_scale(window_global, world)
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                try:
                    for micro, (x, y) in enumerate(batches):
                        last = micro == accum - 1
                        with contextlib.nullcontext() if last or world == 1 else accelerator.no_sync(net):
                            loss = forward_loss_sum(net, unwrapped, x.to(device), y.to(device), head)
                            accelerator.backward(loss * scale)
                        loss_sum += loss.detach().double()
                        del loss
                        if memory_limit_bytes and device.type == "cpu" and current_rss_bytes() > memory_limit_bytes:
                            raise _OverBudget(f"resident memory {current_rss_bytes() / 2**30:.2f} GiB is over the "
                                              f"limit of {memory_limit_bytes / 2**30:.2f} GiB")
                except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raises
                    if not _is_oom(exc) or world > 1:
                        raise
                    loss = None
                    optimizer.zero_grad(set_to_none=True)
                    batches = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    trim_heap()
                    if micro_batch == 1:
                        save(step, collective=False)
                        raise RunError(f"out of memory at step {step + 1} with micro-batch 1 ({exc}); a checkpoint "
                                       f"is saved in {run_dir}. Lower seq_len, set gradient_checkpointing=true, use "
                                       "method=qlora or a smaller model, or give a larger budget; then --resume") from None
                    micro_batch, accum = halve_micro_batch(micro_batch, accum)
                    eval_batch[0] = min(eval_batch[0], micro_batch)
                    backoffs.append({"step": step + 1, "micro_batch_size": micro_batch, "grad_accum_steps": accum,
                                     "reason": f"{type(exc).__name__}: {str(exc)[:160]}"})
                    _print(accelerator, f"out of memory at step {step + 1} ({type(exc).__name__}); backing off to "
                                        f"micro-batch {micro_batch} x accumulation {accum} (same effective batch) and "
                                        "running the step again")
                    continue
                grad_norm = None
                if recipe.max_grad_norm > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(params, recipe.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if world > 1:
                    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
                step += 1
                dt = time.perf_counter() - t0
                train_seconds += dt
                train_tokens += tokens_per_step
                mean_loss = float(loss_sum) / max(1, window_global)
                peak = peak_memory_bytes(device)
                tps = tokens_per_second(tokens_per_step, dt)
                if accelerator.is_main_process:
                    mfile.write(json.dumps({"step": step, "loss": round(mean_loss, 5), "lr": scheduler.get_last_lr()[0],
                                            "grad_norm": grad_norm, "tokens": train_tokens,
                                            "tokens_per_second": round(tps, 2), "step_seconds": round(dt, 4),
                                            "peak_memory_bytes": peak, **({"bitnet_strength": strength} if bit else {})}) + "\n")
                    mfile.flush()
                progress.update(step, f"loss {mean_loss:.4f}  {tps:6.1f} tok/s  peak {peak / 2**30:.2f} GiB",
                                recipe.log_every)
                if recipe.eval_every and step % recipe.eval_every == 0 and step < horizon["steps"]:
                    vl = validate()
                    _print(accelerator, f"step {step}: validation loss {vl:.4f} (perplexity {math.exp(vl):.2f})")
                    if accelerator.is_main_process:
                        mfile.write(json.dumps({"step": step, "val_loss": vl}) + "\n")
                if recipe.save_every and step % recipe.save_every == 0 and step < horizon["steps"]:
                    save(step)
                if time_limit_s is not None and step < horizon["steps"]:
                    elapsed = time.perf_counter() - t_start
                    mean_step = (train_seconds - session_train_s0) / max(1, step - start_step)
                    final_eval_s = val_seconds  # the closing evaluation costs what the opening one did
                    if step - start_step in (2, 5, 20, 50, 200, 1000):
                        left = time_limit_s - elapsed - final_eval_s - 10
                        horizon["steps"] = max(step, min(recipe.max_steps, step + int(left / mean_step)))
                        progress.set_total(horizon["steps"])
                        _print(accelerator, f"measured {mean_step:.2f} s/step: {horizon['steps']} steps fit the time limit")
                    stop = elapsed + mean_step + final_eval_s + 5.0 > time_limit_s
                    if world > 1:
                        stop = bool(accelerator.reduce(torch.tensor([int(stop)], device=device), reduction="max").item())
                    if stop:
                        stopped_for_time = True
                        _print(accelerator, f"time limit {time_limit_s:.0f} s: stopping after step {step} "
                                            f"(mean step {mean_step:.1f} s)")
                        break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if interrupted:
        save(step, collective=False)
        _print(accelerator, f"interrupted: checkpoint saved at step {step} in {run_dir}; continue with --resume")
        raise SystemExit(130)

    save(step)
    val_after = validate()
    peak = peak_memory_bytes(device)
    if world > 1:
        peak = int(accelerator.reduce(torch.tensor([peak], device=device), reduction="max").item())
    tps = tokens_per_second(train_tokens, train_seconds)
    summary = {
        "method": recipe.method, "recipe": recipe.name, "model": source.name, "steps": step,
        "train_tokens": train_tokens, "tokens_per_second": round(tps, 2),
        "mfu": round(mfu(tps / world, flops_tok, ceiling), 4), "peak_memory_bytes": peak,
        "wall_seconds": round(time.perf_counter() - t_start, 2), "train_seconds": round(train_seconds, 2),
        "val_loss_before": round(val_before, 5), "val_loss_after": round(val_after, 5),
        "val_perplexity_before": round(math.exp(val_before), 4), "val_perplexity_after": round(math.exp(val_after), 4),
        "val_tokens": int(packed.val_ids.numel()), "trainable_params": trainable, "total_params": total,
        "flops_per_token": flops_tok, "peak_flops": ceiling, "peak_flops_source": ceiling_how,
        "malloc_mmap_threshold_fixed": heap_bounded, "allocator": heap_allocator(),
        "max_steps": recipe.max_steps, "planned_steps": horizon["steps"], "stopped_for_time": stopped_for_time,
        "time_limit_seconds": time_limit_s,
        "memory_limit_bytes": memory_limit_bytes, "backoffs": backoffs,
        "micro_batch_size_final": micro_batch, "grad_accum_steps_final": accum,
        "world_size": world, "device": str(device), "machine": machine_info(), "versions": _versions(),
        "data": {k: rep[k] for k in ("source", "format", "instruction_template", "kept", "dropped", "train_sequences",
                                     "val_sequences") if k in rep},
        **(extra_summary or {}),
    }
    if accelerator.is_main_process:
        save_final(unwrapped, tokenizer, run_dir, recipe)
        atomic_write_json(run_dir / "summary.json", summary)
        _print(accelerator, f"done: {step} steps, {train_tokens:,} tokens at {tps:.1f} tokens/s (MFU {summary['mfu']:.1%}), "
                            f"validation perplexity {summary['val_perplexity_before']:.2f} -> "
                            f"{summary['val_perplexity_after']:.2f}, peak memory {peak / 2**30:.2f} GiB; saved in {run_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def make_optimizer(groups, recipe: Recipe, device: torch.device):
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    import bitsandbytes as bnb

    if recipe.optimizer == "adamw_8bit":
        return bnb.optim.AdamW8bit(groups, lr=recipe.learning_rate)
    if device.type != "cuda":
        from qtrain.recipe import RecipeError
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
