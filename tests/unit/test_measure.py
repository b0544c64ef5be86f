import math

import pytest
import torch

from qtrain.measure import lr_at, mfu, train_flops_per_token
from qtrain.loss import causal_lm_loss_sum
from qtrain.train import count_target_tokens, loss_scale, sample_indices


def test_lr_schedule_warmup_then_cosine_to_floor():
    kw = dict(base_lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)


def test_flops_per_token_counts_frozen_and_trainable():
    # 6 per trainable, 4 per frozen weight, plus 12 * L * d * T for attention
    assert train_flops_per_token(100, 10, 2, 8, 16) == 6 * 10 + 4 * 100 + 12 * 2 * 8 * 16
    assert mfu(100.0, 1e9, 2e11) == pytest.approx(0.5)


def test_sample_indices_cover_each_epoch_once_across_ranks():
    n, mb, accum, world = 37, 2, 3, 2
    seen = []
    steps = math.ceil(n / (mb * accum * world))
    for step in range(steps):
        for micro in range(accum):
            for rank in range(world):
                seen += sample_indices(step, micro, rank, world, mb, accum, n, seed=5)
    first_epoch = seen[:n]
    assert sorted(first_epoch) == list(range(n))
    # a pure function of the position: the same call gives the same answer
    assert sample_indices(3, 1, 1, world, mb, accum, n, seed=5) == sample_indices(3, 1, 1, world, mb, accum, n, seed=5)
    assert sample_indices(0, 0, 0, 1, 4, 1, n, seed=1) != sample_indices(0, 0, 0, 1, 4, 1, n, seed=2)


def test_accumulated_scaled_grads_equal_full_batch_mean_loss_grad():
    """Loss normalisation under gradient accumulation with masked labels: tokens, not micro-batches, weigh."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(11, 5)
    head = torch.nn.Linear(5, 11)
    params = list(emb.parameters()) + list(head.parameters())
    ids = torch.randint(0, 11, (4, 7))
    labels = ids.clone()
    labels[0, :5] = -100  # an Alpaca-like prompt mask: micro-batches carry different token counts
    labels[2, :2] = -100

    def logits(x):
        return head(emb(x))

    full = causal_lm_loss_sum(logits(ids), labels) / count_target_tokens(labels)
    g_full = torch.autograd.grad(full, params)
    window = count_target_tokens(labels)
    grads = [torch.zeros_like(p) for p in params]
    for i in range(4):
        loss = causal_lm_loss_sum(logits(ids[i:i + 1]), labels[i:i + 1]) * loss_scale(window, 1)
        for g, gi in zip(grads, torch.autograd.grad(loss, params)):
            g += gi
    for a, b in zip(g_full, grads):
        torch.testing.assert_close(a, b)


def test_loss_scale_accounts_for_ddp_averaging():
    assert loss_scale(100, 2) == pytest.approx(0.02)
    assert loss_scale(0, 1) == 1.0


def test_fit_reexecs_with_jemalloc_only_when_wanted_and_found(monkeypatch):
    import qtrain.measure as m
    from qtrain.errors import QtrainError

    monkeypatch.setattr(m, "heap_allocator", lambda: "glibc")
    monkeypatch.setattr(m.platform, "system", lambda: "Linux")
    monkeypatch.setattr(m, "find_jemalloc", lambda: "/usr/lib/libjemalloc.so.2")
    env = m.jemalloc_exec_env({"PATH": "/bin", "LD_PRELOAD": "/opt/other.so"})
    assert env["LD_PRELOAD"] == "/usr/lib/libjemalloc.so.2:/opt/other.so" and env["PATH"] == "/bin"
    assert env["MALLOC_CONF"] == m.JEMALLOC_CONF  # the configuration the planner was calibrated with
    # a user's own options come last, where jemalloc lets them override ours
    assert m.jemalloc_exec_env({"MALLOC_CONF": "narenas:8"})["MALLOC_CONF"] == f"{m.JEMALLOC_CONF},narenas:8"
    assert m.jemalloc_exec_env(env) is None  # the re-executed process does not loop
    assert m.jemalloc_exec_env({"QTRAIN_ALLOCATOR": "glibc"}) is None
    assert m.fit_allocator({"QTRAIN_ALLOCATOR": "glibc"}) == "glibc" and m.fit_allocator({}) == "jemalloc"
    with pytest.raises(QtrainError, match="QTRAIN_ALLOCATOR='tcmalloc'.*auto, jemalloc, glibc"):
        m.jemalloc_exec_env({"QTRAIN_ALLOCATOR": "tcmalloc"})
    monkeypatch.setattr(m, "find_jemalloc", lambda: None)
    assert m.jemalloc_exec_env({}) is None and m.fit_allocator({}) == "glibc"
    with pytest.raises(QtrainError, match="apt install libjemalloc2"):
        m.jemalloc_exec_env({"QTRAIN_ALLOCATOR": "jemalloc"})


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch, tmp_path):
    import qtrain.measure as measure
    from qtrain.recipe import load_recipe
    from qtrain.train import slow_precision_warning

    cpuinfo = tmp_path / "cpuinfo"
    real_open = open

    def fake_open(path, *a, **k):
        return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k)

    monkeypatch.setattr(measure.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr("builtins.open", fake_open)
    bf16, fp32 = load_recipe(None, ["dtype=bfloat16"]), load_recipe(None, [])
    cpu = torch.device("cpu")
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")  # an AVX2-only x86 CPU
    measure._cpuinfo.cache_clear()  # read once per process; the test rewrites it
    assert measure.cpu_has_native_bf16() is False
    message = slow_precision_warning(bf16, cpu)
    assert message and "dtype=bfloat16" in message and "dtype=float32" in message
    assert slow_precision_warning(fp32, cpu) is None
    assert slow_precision_warning(bf16, torch.device("meta")) is None  # not a CPU: not this warning's business
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    measure._cpuinfo.cache_clear()
    assert measure.cpu_has_native_bf16() is True and slow_precision_warning(bf16, cpu) is None
    cpuinfo.unlink()  # unreadable flags: no claim either way
    measure._cpuinfo.cache_clear()
    assert measure.cpu_has_native_bf16() is None and slow_precision_warning(bf16, cpu) is None
    monkeypatch.setattr(measure.platform, "machine", lambda: "aarch64")
    cpuinfo.write_text("flags\t: fpu\n")
    measure._cpuinfo.cache_clear()
    assert measure.cpu_has_native_bf16() is None
    measure._cpuinfo.cache_clear()  # the next test reads the real file


def test_matmul_ceiling_of_a_slow_dtype_is_not_measured_at_full_size(monkeypatch, tmp_path):
    """An emulated dtype (bf16 on an AVX2 CPU, ~1 GFLOP/s) would spend minutes on 2048^3 products."""
    import qtrain.measure as measure

    monkeypatch.setenv("QTRAIN_CACHE", str(tmp_path))
    sizes = []

    def fake(n, repeats, dtype, device):
        sizes.append(n)
        return 1e9 if dtype == torch.bfloat16 else 1.5e11

    monkeypatch.setattr(measure, "measure_matmul_flops", fake)
    assert measure.peak_flops(torch.device("cpu"), torch.bfloat16)[0] == 1e9 and sizes == [512]
    sizes.clear()
    assert measure.peak_flops(torch.device("cpu"), torch.float32)[0] == 1.5e11 and sizes == [512, 2048]
    sizes.clear()
    measure.peak_flops(torch.device("cpu"), torch.bfloat16)  # cached: nothing measured again
    assert sizes == []
