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


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "accelerate")),
                    reason="accelerate CLI not installed")
def test_two_processes_on_cpu(tmp_path, tiny_model_dir, code_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    single = tmp_path / "single"
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    base = ["--model", str(tiny_model_dir), "--data", str(code_dir), *TINY]
    subprocess.run([sys.executable, "-m", "qtrain", "fit", "-o", str(single), *base], check=True, env=env,
                   capture_output=True, timeout=300)
    proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qtrain", "fit", "-o", str(double),
                           *base], env=env, capture_output=True, text=True, timeout=600)
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
