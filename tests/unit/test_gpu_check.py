"""benchmarks/gpu_check.py, the planner's one-go GPU check, run on a CPU in its dry mode (scaled-down shapes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_measures_each_method_against_its_prediction(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--limit", "3", "--steps", "1",
                           "--results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    assert result["dry_run"] and result["git"] is not None
    rows = result["rows"]
    assert [(r["method"], r["gradient_checkpointing"]) for r in rows] == [("full", True), ("lora", True),
                                                                          ("qlora", True)]
    for r in rows:
        assert r["status"] == "ok", r["status"]
        assert r["measured_peak_bytes"] > 0 and r["predicted_peak_bytes"] > r["predicted_body_bytes"] > 0
        assert r["error_vs_measured_peak"] == pytest.approx(r["predicted_peak_bytes"] / r["measured_peak_bytes"] - 1,
                                                            abs=1e-3)
        assert r["measured_tokens_per_second"] > 0
    # the three methods' predictions differ the way their terms do: full holds optimizer states for every weight
    by = {r["method"]: r["terms"] for r in rows}
    assert by["full"]["optimizer_states"] > 10 * by["lora"]["optimizer_states"]
    md = (tmp_path / "gpu_check_dry.md").read_text()
    assert "| full | yes |" in md and "3 rows measured" in md


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_gpu_check_without_a_gpu_says_how_to_run_it(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--results", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()
