"""The training loop end to end on a tiny random-init model: outputs, resume, Ctrl-C, bad input."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from qtrain import cli
from qtrain.checkpoint import CheckpointError
from qtrain.recipe import load_recipe
from qtrain.train import Progress, RunError, fit

TINY = ["seq_len=64", "micro_batch_size=2", "grad_accum_steps=2", "warmup_steps=2", "val_max_sequences=4",
        "lora_r=4", "lora_alpha=8", "learning_rate=1e-3"]


def run(tmp_path, model_dir, data_dir, *extra, name="run", method="lora", steps=4):
    recipe = load_recipe(None, TINY + [f"method={method}", f"max_steps={steps}", *extra])
    out = tmp_path / name
    return fit(recipe, model=str(model_dir), data=str(data_dir), output=out), out


def test_lora_run_writes_a_loadable_adapter_and_summary(tmp_path, tiny_model_dir, code_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary, out = run(tmp_path, tiny_model_dir, code_dir, "save_every=2")
    for key in ("method", "steps", "train_tokens", "tokens_per_second", "mfu", "peak_memory_bytes", "wall_seconds",
                "val_loss_before", "val_loss_after"):
        assert key in summary
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_tokens"] == 4 * 2 * 2 * 64
    assert math.isfinite(summary["val_loss_after"]) and summary["tokens_per_second"] > 0
    assert 0 < summary["mfu"] < 1
    # a random-init model on real code with lr 1e-3 learns something in 4 steps
    assert summary["val_loss_after"] < summary["val_loss_before"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
    assert (out / "recipe.yaml").is_file() and (out / "tokenizer.json").is_file()
    report = json.loads((out / "data_report.json").read_text())
    assert report["kept"] + report["dropped_total"] == report["files_seen"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all("tokens_per_second" in x and "peak_memory_bytes" in x for x in lines)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"


def test_full_run_is_a_transformers_model(tmp_path, tiny_model_dir, code_dir):
    from transformers import AutoModelForCausalLM

    summary, out = run(tmp_path, tiny_model_dir, code_dir, method="full", steps=2)
    assert summary["trainable_params"] == summary["total_params"]
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_bf16_training_keeps_fp32_master_weights_so_small_updates_land(tmp_path, tiny_model_dir, code_dir):
    """AdamW's first step moves every weight by about lr. At lr 1e-5 that is below half a bf16 ulp of most
    weights, so bf16 weights would keep their old value; fp32 masters under bf16 autocast keep the update."""
    from safetensors.torch import load_file as load

    summary, out = run(tmp_path, tiny_model_dir, code_dir, "dtype=bfloat16", "learning_rate=1e-5", "warmup_steps=0",
                       "max_grad_norm=0", "save_every=0", method="full", steps=1)
    assert summary["mixed_precision"] == "bf16"
    before = load(str(next(tiny_model_dir.glob("*.safetensors"))))
    after = load(str(out / "model.safetensors"))
    kept = lost = total = 0
    for name, w in before.items():
        if w.ndim != 2 or name not in after:
            continue
        new = after[name]
        assert new.dtype == torch.float32
        moved = new != w.float()
        kept += int(moved.sum())
        lost += int((moved & (new.bfloat16() == w.bfloat16())).sum())
        total += w.numel()
    assert kept > 0.9 * total  # fp32 masters: nearly every weight moved
    assert lost > 0.5 * kept  # stored in bf16, most of those moves would have rounded away


def test_fp16_needs_cuda_for_loss_scaling(tmp_path, tiny_model_dir, code_dir):
    from qtrain.recipe import RecipeError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 trains here")
    with pytest.raises(RecipeError, match="float16.*CUDA.*bfloat16"):
        run(tmp_path, tiny_model_dir, code_dir, "dtype=float16", method="full", steps=1)


def test_interrupt_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, code_dir, monkeypatch):
    extra = ("lora_dropout=0.1", "save_every=100")
    full, full_out = run(tmp_path, tiny_model_dir, code_dir, *extra, name="straight", steps=6)

    original = Progress.update

    def ctrl_c_at_step_3(self, step, info, every):
        original(self, step, info, every)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "update", ctrl_c_at_step_3)
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, tiny_model_dir, code_dir, *extra, name="broken", steps=6)
    assert exc.value.code == 130
    out = tmp_path / "broken"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(Progress, "update", original)

    recipe = load_recipe(None, TINY + ["max_steps=6", *extra])
    resumed = fit(recipe, model=str(tiny_model_dir), data=str(code_dir), output=out, resume=True)
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert losses(out) == losses(full_out)
    assert resumed["val_loss_after"] == full["val_loss_after"]
    a = load_file(str(full_out / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_resume_refuses_an_incompatible_or_corrupt_checkpoint(tmp_path, tiny_model_dir, code_dir):
    _, out = run(tmp_path, tiny_model_dir, code_dir, steps=2)
    changed = load_recipe(None, TINY + ["max_steps=4", "lora_r=8"])
    with pytest.raises(CheckpointError, match="lora_r=4.*lora_r=8"):
        fit(changed, model=str(tiny_model_dir), data=str(code_dir), output=out, resume=True)
    ck = out / "checkpoints" / "step-000002" / "trainable.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])
    same = load_recipe(None, TINY + ["max_steps=4"])
    with pytest.raises(CheckpointError, match="corrupt"):
        fit(same, model=str(tiny_model_dir), data=str(code_dir), output=out, resume=True)


class _Payload:
    """What a hostile run directory would ship: unpickling it runs code."""
    def __reduce__(self):
        import os

        return (os.system, ("touch " + str(_Payload.marker),))


def test_resume_never_unpickles_and_falls_back_past_a_corrupt_latest(tmp_path, tiny_model_dir, code_dir, capsys):
    first, out = run(tmp_path, tiny_model_dir, code_dir, "save_every=2", steps=4)
    cks = out / "checkpoints"
    assert sorted(p.name for p in cks.glob("step-*")) == ["step-000002", "step-000004"]
    assert (cks / "step-000004" / "rng-0.json").is_file() and not list(cks.glob("*/*.pkl"))
    # the newest checkpoint's optimizer state is a pickle that would run a command
    _Payload.marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "x": _Payload()}, cks / "step-000004" / "optimizer.pt")
    recipe = load_recipe(None, TINY + ["method=lora", "max_steps=4", "save_every=2"])
    summary = fit(recipe, model=str(tiny_model_dir), data=str(code_dir), output=out, resume=True)
    assert not _Payload.marker.exists(), "a checkpoint file was unpickled"
    err = capsys.readouterr()
    assert "step-000004 is corrupt" in err.out + err.err and "older checkpoint" in err.out + err.err
    assert "resumed from" in err.out + err.err and "step-000002" in err.out + err.err
    assert summary["steps"] == 4 and summary["train_tokens"] == first["train_tokens"]


def test_overwrite_needs_a_real_qtrain_marker(tmp_path, tiny_model_dir, code_dir, capsys):
    other = tmp_path / "other-tool"
    other.mkdir()
    (other / "run.json").write_text('{"name": "someone else\'s run"}')
    (other / "weights.bin").write_bytes(b"precious")
    args = ["fit", "--model", str(tiny_model_dir), "--data", str(code_dir), "-o", str(other), *TINY, "max_steps=1",
            "--overwrite"]
    assert cli.main(args) == 2
    assert "not a qtrain run" in capsys.readouterr().err
    assert (other / "weights.bin").read_bytes() == b"precious"


def test_output_directory_rules(tmp_path, tiny_model_dir, code_dir, capsys):
    _, out = run(tmp_path, tiny_model_dir, code_dir, steps=1)
    args = ["fit", "--model", str(tiny_model_dir), "--data", str(code_dir), "-o", str(out), *TINY, "max_steps=1"]
    assert cli.main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    args[6] = str(foreign)
    assert cli.main(args + ["--overwrite"]) == 2
    assert "not a qtrain run" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "precious"
    with pytest.raises(RunError, match="nothing to resume"):
        fit(load_recipe(None, TINY), model=str(tiny_model_dir), data=str(code_dir), output=tmp_path / "none",
            resume=True)


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/dir"], "does not exist"),
    (["--model", "/no/such/model"], "does not exist"),
    (["lora_rnak=4"], "unknown recipe key 'lora_rnak'"),
    (["--recipe", "recipes/none.yaml"], "does not exist"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, tiny_model_dir, code_dir, capsys, args, message):
    base = {"--model": str(tiny_model_dir), "--data": str(code_dir)}
    for i, a in enumerate(args):
        if a in base:
            base[a] = args[i + 1]
    argv = ["fit", "-o", str(tmp_path / "o"), *TINY, "max_steps=1"] + [x for k, v in base.items() for x in (k, v)]
    argv += [a for a in args if "=" in a] + (args if args[0] == "--recipe" else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_fim_with_lora_trains_new_token_rows_and_reloads(tmp_path, tiny_model_dir, code_dir):
    from qtrain.runs import load_trained

    summary, out = run(tmp_path, tiny_model_dir, code_dir, "fim_rate=0.5", steps=2)
    meta = json.loads((out / "run.json").read_text())
    assert len(meta["added_tokens"]) == 3
    model = load_trained(out)
    assert model.get_base_model().config.vocab_size == meta["vocab_size"]
    logits = model(torch.tensor([meta["added_tokens"]])).logits
    assert logits.shape[-1] == meta["vocab_size"] and torch.isfinite(logits).all()


def test_alpaca_run(tmp_path, tiny_model_dir):
    data = tmp_path / "alpaca.jsonl"
    recs = [{"instruction": f"Write a function that returns {i} times its argument.",
             "output": f"def times_{i}(x):\n    return {i} * x\n"} for i in range(60)]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    recipe = load_recipe(None, TINY + ["max_steps=2", "near_dup_threshold=1.0"])
    summary = fit(recipe, model=str(tiny_model_dir), data=str(data), output=tmp_path / "a")
    assert summary["data"]["format"] == "alpaca" and math.isfinite(summary["val_loss_after"])


def test_overwrite_with_bad_data_keeps_the_old_run(tmp_path, tiny_model_dir, code_dir, capsys):
    _, out = run(tmp_path, tiny_model_dir, code_dir, steps=1)
    before = sorted(p.name for p in out.iterdir())
    argv = ["fit", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing"), "-o", str(out), "--overwrite",
            *TINY, "max_steps=1"]
    assert cli.main(argv) == 2
    assert sorted(p.name for p in out.iterdir()) == before


def test_qlora_trains_on_cpu_with_nf4_base(tmp_path, tiny_model_dir, code_dir):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # bitsandbytes' 4-bit kernels need rows of at least 64 values; the 32-wide tiny model is too narrow
    wide = tmp_path / "wide"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(wide)
    tok.save_pretrained(wide)
    tiny_model_dir = wide
    summary, out = run(tmp_path, tiny_model_dir, code_dir, method="qlora", steps=2)
    assert summary["method"] == "qlora" and math.isfinite(summary["val_loss_after"])
    assert summary["trainable_params"] < summary["total_params"] / 2
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    from qtrain.methods import quantization_config
    from qtrain.recipe import Recipe

    q = quantization_config(Recipe(method="qlora"), "cpu")
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant and q.bnb_4bit_compute_dtype == torch.float32
    assert quantization_config(Recipe(method="qlora"), "cuda").bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb is not None


def test_qlora_gradients_flow_through_the_4bit_base_after_an_eval_forward(tmp_path, tiny_model_dir):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel after an eval forward (on AVX512-BF16 CPUs)
    and then drops the input gradient through them in training; prepare_model keeps the differentiable path."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qtrain.methods import prepare_model, quantization_config
    from qtrain.models import load_model, resolve_model_source
    from qtrain.recipe import Recipe

    wide = tmp_path / "wide"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(wide)
    recipe = Recipe(method="qlora", lora_dropout=0.0, gradient_checkpointing=False)
    x = torch.randint(0, len(tok), (1, 32))

    def first_adapter_grad(eval_first: bool) -> torch.Tensor:
        torch.manual_seed(1)
        net = load_model(resolve_model_source(str(wide)), dtype=torch.float32,
                         quantization_config=quantization_config(recipe, "cpu"), device_map={"": "cpu"})
        net = prepare_model(net, recipe)
        for n, p in net.named_parameters():  # nonzero B, so the adapters' own paths carry gradient too
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        if eval_first:
            net.eval()
            with torch.no_grad():
                net(input_ids=x)
        net.train()
        net(input_ids=x, labels=x).loss.backward()
        layer0 = [p.grad for n, p in net.named_parameters() if "layers.0.self_attn.q_proj.lora_A" in n]
        return layer0[0].clone()

    fresh, after_eval = first_adapter_grad(False), first_adapter_grad(True)
    assert fresh.abs().sum() > 0
    assert torch.allclose(fresh, after_eval, rtol=1e-4, atol=1e-6)


def test_paged_optimizer_needs_cuda(tmp_path, tiny_model_dir, code_dir):
    from qtrain.recipe import RecipeError

    with pytest.raises(RecipeError, match="paged_adamw_8bit.*CUDA"):
        run(tmp_path, tiny_model_dir, code_dir, "optimizer=paged_adamw_8bit", steps=1)


def test_out_of_memory_backs_off_the_micro_batch_and_keeps_the_data(tmp_path, tiny_model_dir, code_dir, monkeypatch):
    from qtrain import train
    from qtrain.train import halve_micro_batch

    assert [halve_micro_batch(8, 1), halve_micro_batch(6, 2), halve_micro_batch(3, 4)] == [(4, 2), (3, 4), (1, 12)]
    straight, _ = run(tmp_path, tiny_model_dir, code_dir, "micro_batch_size=1", "grad_accum_steps=4", "lora_dropout=0",
                      name="mb1", steps=3)
    real = train.forward_loss_sum
    calls = {"n": 0}

    def oom_on_big_batches(net, unwrapped, x, y, head, *rest):
        if x.shape[0] > 1:
            calls["n"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(net, unwrapped, x, y, head, *rest)

    monkeypatch.setattr(train, "forward_loss_sum", oom_on_big_batches)
    backed, out = run(tmp_path, tiny_model_dir, code_dir, "micro_batch_size=4", "grad_accum_steps=1", "lora_dropout=0",
                      name="mb4", steps=3)
    assert calls["n"] == 4  # validation 4 -> 2 -> 1, then training 4 -> 2 -> 1 at step 1; later steps start there
    assert [(b["micro_batch_size"], b["grad_accum_steps"]) for b in backed["backoffs"]] == [(2, 2), (1, 4)]
    assert backed["micro_batch_size_final"] == 1 and backed["steps"] == 3
    # the same sequences per step as a run that used micro-batch 1 from the start
    assert backed["val_loss_after"] == pytest.approx(straight["val_loss_after"], abs=1e-5)


def test_out_of_memory_at_micro_batch_1_stops_with_a_checkpoint_and_the_way_out(tmp_path, tiny_model_dir, code_dir):
    recipe = load_recipe(None, TINY + ["max_steps=3", "micro_batch_size=2", "grad_accum_steps=1"])
    with pytest.raises(RunError, match="out of memory at step 1 with micro-batch 1.*gradient_checkpointing=true"):
        fit(recipe, model=str(tiny_model_dir), data=str(code_dir), output=tmp_path / "r", memory_limit_bytes=1)
    assert (tmp_path / "r" / "checkpoints" / "latest").is_file()


def test_time_budget_plans_replans_and_stops(monkeypatch):
    from qtrain import train
    from qtrain.train import TimeBudget

    now = {"t": 100.0}
    monkeypatch.setattr(train.time, "perf_counter", lambda: now["t"])
    budget = TimeBudget(limit_s=60.0, t_start=100.0, closing_eval_s=4.0)
    assert budget.seconds_left() == 60 - 4 - TimeBudget.RESERVE_S
    assert [n for n in range(1, 30) if budget.replan(n)] == [2, 5, 20]
    now["t"] = 140.0  # 40 s gone: a 10 s step, the 4 s closing evaluation and the margin still fit in 60 s
    assert not budget.must_stop(mean_step_s=10.0)
    assert budget.must_stop(mean_step_s=12.0)


def test_a_time_limit_shapes_the_horizon(tmp_path, tiny_model_dir, code_dir):
    """No time to spare: the plan is one step, saved and summarised; plenty of time: the recipe's max_steps."""
    recipe = load_recipe(None, TINY + ["max_steps=3"])
    short = fit(recipe, model=str(tiny_model_dir), data=str(code_dir), output=tmp_path / "short", time_limit_s=1e-3)
    assert short["planned_steps"] == 1 and short["steps"] == 1 and short["time_limit_seconds"] == 1e-3
    assert (tmp_path / "short" / "adapter_model.safetensors").is_file()
    long = fit(recipe, model=str(tiny_model_dir), data=str(code_dir), output=tmp_path / "long", time_limit_s=3600)
    assert long["planned_steps"] == 3 and long["steps"] == 3 and not long["stopped_for_time"]


def test_resident_memory_guard_backs_off_a_run_the_planner_under_predicted(tmp_path, tiny_model_dir, code_dir,
                                                                           monkeypatch):
    """`fit --budget` on a CPU enforces the budget at run time too. Here the planner is made to under-predict
    (every prediction a tenth of itself), so it picks micro-batch 4; resident memory is simulated as growing with
    the sequences in flight so that micro-batch 4 is over the budget and 2 is under. The run backs off once,
    keeps the effective batch and finishes."""
    from qtrain import cli, plan, train
    from qtrain.plan import Prediction

    real_predict = plan.predict

    def under(*a, **k):
        p = real_predict(*a, **k)
        return Prediction({n: v // 10 for n, v in p.terms.items()}, p.peak_bytes // 10, p.tokens_per_second,
                          p.load_peak_bytes // 10)

    monkeypatch.setattr(plan, "predict", under)
    budget = 4 * 2**30
    in_flight = {"n": 0}
    real_loss = train.forward_loss_sum

    def counting(net, unwrapped, x, *rest):
        in_flight["n"] = x.shape[0]
        return real_loss(net, unwrapped, x, *rest)

    monkeypatch.setattr(train, "forward_loss_sum", counting)
    monkeypatch.setattr(train, "current_rss_bytes", lambda: int(budget * (0.5 + 0.2 * in_flight["n"])))
    out = tmp_path / "guarded"
    code = cli.main(["fit", "--budget", "4GB", "--device", "cpu", "--model", str(tiny_model_dir), "--data",
                     str(code_dir), "-o", str(out), "--max-steps", "2", "seq_len=64", "micro_batch_size=4",
                     "grad_accum_steps=1", "warmup_steps=1", "val_max_sequences=4", "save_every=0"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predicted_peak_bytes"] < budget  # what the (under-predicting) planner promised
    assert summary["memory_limit_bytes"] == budget
    assert [(b["micro_batch_size"], b["grad_accum_steps"]) for b in summary["backoffs"]] == [(2, 2)]
    assert summary["micro_batch_size_final"] == 2 and summary["steps"] == 2


def test_val_seq_len_fixes_the_validation_split_whatever_seq_len_trains(tiny_model_dir, code_dir):
    from qtrain.models import load_tokenizer, resolve_model_source
    from qtrain.recipe import RecipeError
    from qtrain.train import build_data

    tok = load_tokenizer(resolve_model_source(str(tiny_model_dir)))
    short = build_data(str(code_dir), load_recipe(None, TINY + ["seq_len=32", "val_seq_len=64"]), tok)
    same = build_data(str(code_dir), load_recipe(None, TINY), tok)
    assert short.train_ids.shape[1] == 32 and short.val_ids.shape[1] == 64
    assert torch.equal(short.val_ids, same.val_ids) and torch.equal(short.val_labels, same.val_labels)
    with pytest.raises(RecipeError, match="val_seq_len"):
        load_recipe(None, ["val_seq_len=0"])
