"""`accelerate launch --num_processes 2` on CPU (gloo) runs the same recipe unchanged."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

TINY = ["seq_len=64", "micro_batch_size=2", "grad_accum_steps=2", "warmup_steps=1", "val_max_sequences=4",
        "lora_r=4", "lora_alpha=8", "max_steps=3", "save_every=2"]


NEEDS_ACCELERATE = pytest.mark.skipif(
    shutil.which("accelerate") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "accelerate")),
    reason="accelerate CLI not installed")


@NEEDS_ACCELERATE
def test_two_processes_on_cpu(tmp_path, tiny_model_dir, code_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    single = tmp_path / "single"
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["--model", str(tiny_model_dir), "--data", str(code_dir), *TINY]
    subprocess.run([sys.executable, "-m", "qtrain", "fit", "-o", str(single), *base], check=True, env=env,
                   capture_output=True, timeout=300)
    proc = _launch(["-o", str(double), *base], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((double / "summary.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    # `qtrain fit` re-executes itself with the system jemalloc when there is one (qtrain.measure.jemalloc_exec_env)
    from qtrain.measure import find_jemalloc

    assert s1["allocator"] == s2["allocator"] == ("jemalloc" if find_jemalloc() else "glibc")
    # tokens are counted across processes: twice the samples per step
    assert s2["train_tokens"] == 2 * s1["train_tokens"] == 2 * 3 * 2 * 2 * 64
    assert math.isfinite(s2["val_loss_after"]) and s2["steps"] == 3
    assert set(os.listdir(single)) <= set(os.listdir(double)) | {"README.md"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), double)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    ck = double / "checkpoints" / (double / "checkpoints" / "latest").read_text().strip()
    assert {"rng-0.json", "rng-1.json", "trainable.safetensors", "optimizer.pt"} <= set(os.listdir(ck))


def _launch(args, env, timeout=600):
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qtrain", "fit", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)



def _single_and_sharded(tmp_path, common: list[str], env: dict):
    """The same recipe in one process at micro-batch 2 and sharded over 2 processes at micro-batch 1: the same
    samples per step. Returns (single run dir, sharded run dir, the launcher's completed process)."""
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    subprocess.run([sys.executable, "-m", "qtrain", "fit", "-o", str(single), *common, "micro_batch_size=2"],
                   check=True, env=env, capture_output=True, timeout=300)
    proc = _launch(["-o", str(sharded), *common, "micro_batch_size=1", "fsdp=true"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return single, sharded, proc


@NEEDS_ACCELERATE
def test_fsdp_two_processes_match_one_process_and_resume_from_sharded_checkpoints(tmp_path, tiny_model_dir, code_dir):
    """Full fine-tuning sharded over 2 CPU processes (FSDP2 under gloo) on the same samples per step as one
    process at twice the micro-batch: the same losses and weights within float tolerance. Then a copy of the run
    rewound to its step-2 checkpoint (one shard file per process) resumes to the same final weights."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--model", str(tiny_model_dir), "--data", str(code_dir), "method=full", "seq_len=64",
              "grad_accum_steps=2", "warmup_steps=1", "val_max_sequences=4", "max_steps=3", "save_every=2",
              "learning_rate=1e-3"]
    single, sharded, proc = _single_and_sharded(tmp_path, common, env)
    assert "sharded over 2 processes" in proc.stdout + proc.stderr
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((sharded / "summary.json").read_text())
    assert s2["sharded"] and s2["world_size"] == 2 and not s1["sharded"]
    assert s2["train_tokens"] == s1["train_tokens"]
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses(sharded) == pytest.approx(losses(single), abs=1e-4)
    assert s2["val_loss_after"] == pytest.approx(s1["val_loss_after"], abs=1e-4)
    assert s2["val_loss_after"] < s2["val_loss_before"]  # it trained
    a, b = load_file(str(single / "model.safetensors")), load_file(str(sharded / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    ck = sharded / "checkpoints" / "step-000002"
    assert {"trainable-rank0.safetensors", "trainable-rank1.safetensors", "optimizer-rank0.pt",
            "optimizer-rank1.pt"} <= set(os.listdir(ck))
    # each rank's file holds half of the embedding rows
    emb = [k for k in a if "embed_tokens" in k][0]
    assert load_file(str(ck / "trainable-rank0.safetensors"))[emb].shape[0] * 2 == a[emb].shape[0]

    rewound = tmp_path / "rewound"
    shutil.copytree(sharded, rewound)
    shutil.rmtree(rewound / "checkpoints" / "step-000003")
    (rewound / "checkpoints" / "latest").write_text("step-000002\n")
    proc = _launch(["-o", str(rewound), *common, "micro_batch_size=1", "fsdp=true", "--resume"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = load_file(str(rewound / "model.safetensors"))
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=1e-6)
    assert json.loads((rewound / "summary.json").read_text())["val_loss_after"] == pytest.approx(
        s2["val_loss_after"], abs=1e-6)
    # and a different number of processes is refused by name
    proc = subprocess.run([sys.executable, "-m", "qtrain", "fit", "-o", str(rewound), *common, "micro_batch_size=1",
                           "fsdp=true", "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "2 process(es)" in proc.stderr


@NEEDS_ACCELERATE
def test_fsdp_lora_matches_one_process_and_saves_a_plain_adapter(tmp_path, tiny_model_dir, code_dir):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--model", str(tiny_model_dir), "--data", str(code_dir), "method=lora", "lora_dropout=0", "lora_r=4",
              "seq_len=64", "grad_accum_steps=2", "warmup_steps=1", "val_max_sequences=4", "max_steps=2",
              "save_every=0"]
    single, sharded, _ = _single_and_sharded(tmp_path, common, env)
    a = load_file(str(single / "adapter_model.safetensors"))
    b = load_file(str(sharded / "adapter_model.safetensors"))
    assert set(a) == set(b) and all("lora_" in k for k in b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((sharded / "summary.json").read_text())
    assert s2["sharded"] and s2["val_loss_after"] == pytest.approx(s1["val_loss_after"], abs=1e-4)
