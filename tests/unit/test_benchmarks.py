"""The benchmark scripts still start: each parses its options (``--help``), and the planner-only one runs whole."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name not in ("common.py", "update_readme.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_script_parses_its_options(script):
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_plan_anchors_runs_and_writes_the_shared_header(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/plan_anchors.py", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "plan_anchors.json").read_text())
    assert result["benchmark"] == "plan_anchors" and result["plan_command_ok"]
    assert {"git", "machine", "versions"} <= result.keys()
    assert all(r["predicted_gib"] > 0 for r in result["rows"])
    assert (tmp_path / "plan_anchors.md").read_text().startswith("# Planner vs published")
