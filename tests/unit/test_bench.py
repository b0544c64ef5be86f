"""qtrain bench: rows in subprocesses with CodeCarbon, failures kept, resume, report and plots, budget answers."""

import json

import pytest
import yaml

from qtrain import bench, cli

SMALL = {"seq_len": 64, "micro_batch_size": 2, "grad_accum_steps": 1, "lora_r": 4, "lora_alpha": 8,
         "val_max_sequences": 4}


def test_shipped_matrices_are_valid_recipes():
    methods = bench.matrix_rows("methods")
    assert {bench.row_recipe(r, 2).method for r in methods} == \
        {"full", "lora", "qlora", "bitnet"}
    assert sum(bench.row_recipe(r, 2).gradient_checkpointing for r in methods) == 4
    trade = bench.matrix_rows("tradeoff")
    base = bench.row_recipe(trade[0], 2)
    assert (base.lora_r, base.micro_batch_size, base.seq_len, base.learning_rate) == (64, 2, 1024, 5e-5)
    # one variable at a time: every other row differs from the base in exactly one of the seed's variables
    for r in trade[1:]:
        rec = bench.row_recipe(r, 2)
        diff = [k for k in bench.TRADEOFF_RANGES if getattr(rec, k) != getattr(base, k)]
        assert diff == [r["group"]], r["name"]
    assert len(trade) == 1 + sum(len(v) - 1 for v in bench.TRADEOFF_RANGES.values())
    with pytest.raises(bench.BenchError, match="neither a shipped matrix"):
        bench.matrix_rows("nope")


def test_matrix_runs_rows_keeps_failures_resumes_and_reports(tmp_path, tiny_model_dir, code_dir, capsys):
    matrix = tmp_path / "m.yaml"
    matrix.write_text(yaml.safe_dump({"rows": [
        {"name": "lora", "overrides": {**SMALL, "method": "lora"}},
        {"name": "full+ckpt", "overrides": {**SMALL, "method": "full", "gradient_checkpointing": True,
                                            "learning_rate": 1e-4}},
        # needs a GPU: fails at run time, after the recipe validated
        {"name": "paged", "overrides": {**SMALL, "method": "lora", "optimizer": "paged_adamw_8bit"}},
    ]}))
    out = tmp_path / "out"
    code = cli.main(["bench", "--matrix", str(matrix), "--steps", "2", "--model", str(tiny_model_dir),
                     "--data", str(code_dir), "-o", str(out)])
    assert code == 1  # one row failed, and the command says so
    err = capsys.readouterr().err
    assert "1 row(s) failed: paged" in err
    rows = {r["name"]: r for r in bench.load_rows(out)}
    assert rows["paged"]["status"] == "failed" and "CUDA" in rows["paged"]["error"]
    ok = rows["lora"]
    assert ok["status"] == "ok" and ok["steps"] == 2 and ok["tokens_per_second"] > 0 and ok["peak_memory_bytes"] > 0
    assert ok["predicted_peak_bytes"] > 0 and ok["git"] and ok["versions"]["torch"]
    e = ok["energy"]
    assert e["kwh"] > 0 and e["co2_kg"] > 0 and e["label"] and e["cpu_mode"]
    if e["sanity"]["ratio"] is not None:  # estimate mode: CodeCarbon's CPU energy = CPU seconds x TDP per core
        assert 0.5 < e["sanity"]["ratio"] < 2.0, e["sanity"]
    report = (out / "report.md").read_text()
    assert "| lora | lora |" in report and "FAILED" in report and "memory_vs_throughput.png" in report
    assert (out / "memory_vs_throughput.png").stat().st_size > 10_000 and (out / "energy_per_mtok.png").is_file()
    # a row is a measurement: its run keeps the summary, not the weights
    run = out / "runs" / "lora"
    assert (run / "summary.json").is_file() and not list(run.glob("*.safetensors")) and not (run / "checkpoints").exists()

    # rerun: finished rows are kept as they were, the failed one is tried again (and fails again)
    before = (out / "rows" / "lora.json").read_text()
    assert cli.main(["bench", "--matrix", str(matrix), "--steps", "2", "--model", str(tiny_model_dir),
                     "--data", str(code_dir), "-o", str(out)]) == 1
    assert (out / "rows" / "lora.json").read_text() == before
    assert "lora: done before, kept" in capsys.readouterr().out
    assert cli.main(["bench", "--report", str(out)]) == 0


def test_bad_matrix_rows_fail_before_running(tmp_path, capsys):
    m = tmp_path / "bad.yaml"
    m.write_text(yaml.safe_dump({"rows": [{"name": "x", "overrides": {"lora_rnak": 8}}]}))
    assert cli.main(["bench", "--matrix", str(m), "-o", str(tmp_path / "o")]) == 2
    assert "lora_rnak" in capsys.readouterr().err and not (tmp_path / "o" / "rows").exists()
    m.write_text("rows: 3")
    assert cli.main(["bench", "--matrix", str(m)]) == 2
    assert cli.main(["bench"]) == 2


def test_budget_matrix_and_budget_answer(tmp_path, capsys):
    assert cli.main(["bench", "--matrix", "budget", "-o", str(tmp_path / "b")]) == 0
    rows = json.loads((tmp_path / "b" / "budget.json").read_text())
    cl = {r["budget_gib"]: r for r in rows if r["model"] == "codellama/CodeLlama-7b-hf"}
    assert cl[4]["method"] is None and cl[8]["method"] == "qlora" and cl[24]["method"] in ("lora", "full")
    assert all(r["predicted_peak_bytes"] <= r["budget_gib"] * 2**30 for r in rows if r["method"])
    capsys.readouterr()
    assert cli.main(["bench", "--budget", "8GB", "--device", "cuda", "--model", "codellama/CodeLlama-7b-hf",
                     "--results", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "qlora" in out and "predicted" in out and "pick: #1" in out


def test_export_row_records_int8_size_and_decode_speed(tmp_path, tiny_model_dir, code_dir, capsys):
    matrix = tmp_path / "m.yaml"
    matrix.write_text(yaml.safe_dump({"rows": [{"name": "lora-int8", "overrides": {**SMALL, "method": "lora"},
                                                "export": "int8"}]}))
    out = tmp_path / "out"
    assert cli.main(["bench", "--matrix", str(matrix), "--steps", "1", "--model", str(tiny_model_dir),
                     "--data", str(code_dir), "-o", str(out)]) == 0
    (row,) = bench.load_rows(out)
    x = row["export"]
    assert x.get("format") == "onnx-int8", x
    assert x["bytes"] > 0 and x["decode_tokens_per_second"] > 0
    assert "| lora-int8 | onnx-int8 |" in (out / "report.md").read_text()
    assert not (out / "runs" / "lora-int8" / "onnx").exists()  # figures kept, the export itself dropped


def test_report_of_only_failed_rows(tmp_path):
    rows = [{"name": "a", "status": "failed", "error": "CUDA is not available"}]
    text = bench.render_report(rows, tmp_path, "t", "qtrain bench --matrix x")
    assert "| a | FAILED: CUDA is not available |" in text


def test_quality_matrix_scores_every_row_pairs_it_with_base_and_ranks_the_budget(tmp_path, chat_model_dir, code_dir,
                                                                                capsys):
    from test_eval import mbpp_path

    from qtrain.quality import quality_rows

    if mbpp_path() is None:
        pytest.skip("mbpp.jsonl not found (set QTRAIN_MBPP)")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Write f{i}.", "completion": f"```python\ndef f{i}():\n    return "
                                       f"{i}\n```"}) + "\n" for i in range(40)))
    rows = quality_rows(2.0, str(sft), methods=(("lora", None),))
    assert [r["name"] for r in rows] == ["base", "lora+code", "lora+selftrain"]
    for r in rows[1:]:
        r["overrides"].update(SMALL, method="lora", near_dup_threshold=1.0, min_file_bytes=1)
    out = tmp_path / "q"
    results = bench.run_matrix("quality", out, 1_000_000, model=str(chat_model_dir), data=str(code_dir), rows=rows,
                               quality={"mbpp": str(mbpp_path()), "limit": 2}, say=lambda m: None)
    assert [r["status"] for r in results] == ["ok"] * 3, [r.get("error") for r in results]
    for r in results:
        q = r["quality"]
        assert q["problems"] == 2 and q["pass@1"] == 0.0 and q["val_perplexity"] > 1
        assert q["wilson95"][0] == 0.0 and 0 < q["wilson95"][1] < 1
    trained = results[1:]
    assert all(r["steps"] >= 1 and r["recipe"]["max_steps"] == 1_000_000 for r in trained)
    assert trained[1]["recipe"]["name"] == "bench-lora+selftrain"
    from qtrain.quality import render_quality

    text = render_quality(bench.load_rows(out), out, "cmd")
    assert "| lora+selftrain | lora | selftrain |" in text and "+0.00% (+0.00% to +0.00%)" in text
    assert "wall-clock budget (0.0333333 min)" in text  # the rows carry their time budget into the report
    assert (out / "quality_vs_memory.png").stat().st_size > 10_000
    assert cli.main(["bench", "--report", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["bench", "--budget", "8GB", "--device", "cpu", "--model", str(chat_model_dir), "--results",
                     str(out)]) == 0
    answer = capsys.readouterr().out
    first = [line for line in answer.splitlines() if line.strip().startswith("1 ")][0]
    assert "lora" in first and "MBPP (lora+" in first
    # every candidate of an unmeasured method follows, marked as planned only
    full = bench.answer_budget("8GB", str(chat_model_dir), "cpu", [out], limit=1000)
    methods = [line.split()[1] for line in full.splitlines() if line[:4].strip().isdigit()]
    assert methods.index("full") > max(i for i, m in enumerate(methods) if m == "lora")
    assert all("planned only" in line for line in full.splitlines() if line[:4].strip().isdigit() and " full " in line)


def test_quality_matrix_needs_its_eval_data(capsys):
    assert cli.main(["bench", "--matrix", "quality"]) == 2
    assert "--eval-data" in capsys.readouterr().err
