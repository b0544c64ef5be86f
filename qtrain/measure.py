"""Small pure functions for the numbers qtrain reports: memory, tokens/s, FLOPs, MFU, LR schedule."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import resource
import time
from pathlib import Path

import torch
from torch import nn

from qtrain.flops import mfu, train_flops_per_token  # noqa: F401 - measure is where callers look for them


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` of /proc/self/status. Not ``ru_maxrss``: that survives fork + exec, so a subprocess started
    by a large parent reports the parent's peak (seen here: every runtime of the export benchmark "peaked" at
    the driver's 3.4 GiB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def current_rss_bytes() -> int:
    """Resident memory of this process now (VmRSS), 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so RSS follows live memory again."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """The peak that matters on ``device``: CUDA allocator peak on a GPU, process peak RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def cuda_memory_detail(device: torch.device) -> dict | None:
    """On a GPU, what the planner's CUDA terms are checked against: the caching allocator's peak allocated and
    peak reserved bytes, and the device memory in use now (context, reserved cache and any other process:
    ``total - free``). None on a CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return {"max_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            "max_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
            "device_used_bytes": int(total - free), "device_total_bytes": int(total)}


def tokens_per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def matmul_flops(model: nn.Module) -> tuple[int, int]:
    """(frozen, trainable) weight elements that take part in matmuls: every Linear/Conv1D weight, LM head included.

    Embedding lookups do no multiply-adds, so input embeddings are left out; a tied LM head is a real matmul
    and is counted through the output-embedding module.
    """
    frozen = trainable = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            w = module.weight
            if id(w) in seen:
                continue
            seen.add(id(w))
            n = w.numel() * (2 if w.dtype == torch.uint8 else 1)
            if w.requires_grad:
                trainable += n
            else:
                frozen += n
    return frozen, trainable


def lr_at(step: int, *, base_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to ``base_lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * base_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def measure_matmul_flops(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> float:
    """Best-of-``repeats`` FLOP/s of an ``n x n @ n x n`` matmul: the ceiling MFU is measured against."""
    device = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up (thread pool, kernels)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # note: a CPU-GPU sync point, only here
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """The device's matmul ceiling: measured once per machine/threads/dtype and cached. Returns (FLOP/s, how)."""
    from qtrain.io import atomic_write_json
    from qtrain.models import cache_root

    # the CPU's model and instruction-set flags are in the key: a cache directory can outlive the machine under it
    # (a VM moved to another host), and the same "AMD EPYC" name covers AVX2-only and AVX512-BF16 hosts
    where = (_cpu_signature() if device.type == "cpu"
             else torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)
    key = f"{device.type}-{where}-{torch.get_num_threads()}t-{dtype}-{torch.__version__}"
    path = cache_root() / "matmul_ceiling.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        # a small product first: where the dtype is emulated (bf16 on an AVX2 CPU runs at ~1 GFLOP/s) one 2048^3
        # product takes ~15 s, so the full size is measured only where it would take under a second a repeat
        small = measure_matmul_flops(n=512, repeats=3, dtype=dtype, device=device)
        n = 4096 if device.type == "cuda" else 2048
        table[key] = (measure_matmul_flops(n=n, repeats=5, dtype=dtype, device=device)
                      if 2.0 * n**3 / small < 1.0 else small)
        try:
            atomic_write_json(path, table)
        except OSError:
            pass
    return float(table[key]), f"measured {dtype} matmul, {torch.get_num_threads()} threads"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, str]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; empty strings where it cannot be read."""
    name = flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name, flags


def cpu_has_native_bf16() -> bool | None:
    """Whether this x86 CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16, from /proc/cpuinfo's flags); None
    where that cannot be told (no flags, or not x86). Without it oneDNN emulates bf16 matmuls: on an AVX2 AMD EPYC
    (2 threads) they ran ~100x slower than fp32 (benchmarks/results/matmul_dtypes.md)."""
    flags = _cpuinfo()[1]
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686") or not flags:
        return None
    return bool(set(flags.split()) & {"avx512_bf16", "amx_bf16"})


def _cpu_signature() -> str:
    """The CPU's model name and a digest of its flags, or the platform's name where /proc/cpuinfo is missing."""
    import hashlib

    name, flags = _cpuinfo()
    name = name or platform.processor() or platform.machine()
    return f"{name}-{hashlib.sha1(flags.encode()).hexdigest()[:8]}" if flags else name


def machine_info() -> dict:
    info = {"cpu": _cpuinfo()[0] or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number (malloc.h)
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


@functools.lru_cache(maxsize=None)  # fixed for the life of a process; the planner asks once per candidate
def heap_allocator() -> str:
    """The C allocator serving this process's tensors: "jemalloc" when it is loaded (LD_PRELOAD), else "glibc"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return "other"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


def find_jemalloc() -> str | None:
    """Path of a system jemalloc (Debian/Ubuntu: apt install libjemalloc2), or None."""
    return next((p for p in JEMALLOC_PATHS if Path(p).is_file()), None)


ALLOCATOR_CHOICES = ("auto", "jemalloc", "glibc")


def requested_allocator(env: dict | None = None) -> str:
    """``QTRAIN_ALLOCATOR``: auto (jemalloc when the system has it), jemalloc (required) or glibc."""
    value = (env if env is not None else os.environ).get("QTRAIN_ALLOCATOR", "auto").strip().lower() or "auto"
    if value not in ALLOCATOR_CHOICES:
        from qtrain.errors import QtrainError

        raise QtrainError(f"QTRAIN_ALLOCATOR={value!r} is not one of {', '.join(ALLOCATOR_CHOICES)}; unset it for auto")
    return value


def fit_allocator(env: dict | None = None) -> str:
    """The host allocator a ``qtrain fit`` started now would train on (what ``qtrain plan`` predicts for)."""
    env = dict(os.environ) if env is None else env
    return "jemalloc" if heap_allocator() == "jemalloc" or jemalloc_exec_env(env) is not None else "glibc"


def jemalloc_exec_env(env: dict) -> dict | None:
    """The environment to re-execute ``qtrain fit`` in with jemalloc preloaded, or None to run as is.

    Why: with glibc's allocator the peak RSS of a CPU LoRA/QLoRA step is neither small nor repeatable -- freed
    activation memory stays in the heap, and identical runs of the default model peaked 2.40-3.09 GiB
    (benchmarks/results/memory_calibration.md). With jemalloc the same run peaks at 1.34-1.36 GiB, every time,
    at the same throughput within 2% (benchmarks/results/allocator_speed.md); the planner can then predict the
    peak rather than a range. The library must be loaded before the interpreter starts, hence a re-exec (as
    Intel's ``ipexrun --enable-jemalloc`` does).
    ``QTRAIN_ALLOCATOR=glibc`` opts out; ``=jemalloc`` makes a missing library an error.
    """
    wanted = requested_allocator(env)
    if wanted == "glibc" or heap_allocator() == "jemalloc" or platform.system() != "Linux" or env.get("_QTRAIN_REEXEC"):
        return None
    lib = find_jemalloc()
    if lib is None:
        if wanted == "jemalloc":
            from qtrain.errors import QtrainError

            raise QtrainError("QTRAIN_ALLOCATOR=jemalloc but no libjemalloc.so.2 was found; install it "
                              "(apt install libjemalloc2) or unset QTRAIN_ALLOCATOR")
        return None
    # the guard stops a loop when the preload fails (ld.so then only warns)
    return {**env, **jemalloc_preload_env(lib, env), "_QTRAIN_REEXEC": "1"}


# One arena for every thread. By default jemalloc gives each thread one of 4 x cores arenas, so memory freed by
# one thread (oneDNN's and MKL's per-thread packing buffers, autograd's worker) is not reused by another; the
# peak then depends on which thread allocated what. Measured on held-out shapes (LoRA, checkpointing, 4x256, 2
# cores): Gemma 871 -> 822 MiB and StarCoder2 940 -> 894 MiB peak RSS with one arena, at 407 -> 389 and 469 -> 473
# tokens/s (benchmarks/results/allocator_speed.md compares the two on the default model). Small allocations keep
# their per-thread caches (tcache), so threads contend on the arena only for large blocks. A user's own
# MALLOC_CONF comes after and wins (jemalloc reads the options left to right); the planner's constants assume ours.
JEMALLOC_CONF = "narenas:1"


def jemalloc_preload_env(lib: str, env: dict) -> dict:
    """LD_PRELOAD and MALLOC_CONF to start a process on jemalloc configured as the planner was calibrated."""
    return {"LD_PRELOAD": ":".join(x for x in (lib, env.get("LD_PRELOAD")) if x),
            "MALLOC_CONF": ",".join(x for x in (JEMALLOC_CONF, env.get("MALLOC_CONF")) if x)}


def heap_bound_requested() -> int:
    """The fixed glibc mmap threshold asked for with ``QTRAIN_MALLOC_MMAP_THRESHOLD`` (bytes), or 0 (glibc default)."""
    try:
        return max(0, int(os.environ.get("QTRAIN_MALLOC_MMAP_THRESHOLD", "0")))
    except ValueError:
        return 0


def bound_heap_retention(threshold_bytes: int | None = None) -> bool:
    """Opt-in: serve allocations >= ``threshold_bytes`` with mmap, so freed activations leave RSS at once.

    glibc raises its mmap threshold dynamically (up to 32 MiB) after large frees; from then on the 1-30 MiB
    tensors of a LoRA step come from the heap, and freed heap memory stays in RSS. A fixed 1 MiB threshold
    makes peak RSS follow live memory, but every large tensor then costs fresh, zeroed pages: measured on the
    default model (LoRA, fwd+bwd, torch profiler-free timing, this 2-core CPU) 197 -> 150-157 tokens/s at
    1x512 and 224 -> 134 tokens/s at 4x256, for peak RSS 2.88 -> 2.32 GiB and 4.57 -> 3.37 GiB. Speed wins by
    default; the planner models the retention instead (``plan.ALLOCATOR_RETENTION``). Set
    ``QTRAIN_MALLOC_MMAP_THRESHOLD=1048576`` to trade the speed for the memory. Linux/glibc only.
    Returns whether a threshold was applied.
    """
    import ctypes
    import ctypes.util

    value = threshold_bytes or heap_bound_requested()
    if value <= 0 or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, value))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to bound
        return False
