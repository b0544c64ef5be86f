"""What every benchmark script shares: where results go, the header that makes a result traceable (the git
revision, the machine, the library versions), and writing the JSON and Markdown pair atomically.

The scripts run as ``python benchmarks/NAME.py``, so this module is importable as ``common`` from them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def git_sha() -> str:
    """The checkout's short revision ('' outside a git checkout)."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def header(benchmark: str, **fields: Any) -> dict[str, Any]:
    """The first keys of every result: what ran, at which revision, on what machine and library versions."""
    from qtrain.measure import machine_info
    from qtrain.train import _versions

    # a script may pass the git it read when it started (the code that measured, before any later edit)
    return {"benchmark": benchmark, "git": git_sha(), "machine": machine_info(), "versions": _versions(), **fields}


def write_results(name: str, result: dict[str, Any], markdown: str, results: Path = RESULTS) -> None:
    """RESULTS/NAME.json and RESULTS/NAME.md, each written to a temporary file and renamed."""
    from qtrain.io import atomic_write_json, atomic_write_text

    results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results / f"{name}.json", result)
    atomic_write_text(results / f"{name}.md", markdown if markdown.endswith("\n") else markdown + "\n")
