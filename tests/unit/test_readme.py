"""README.md starts with exactly two set-up commands, and CI runs the second one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_two_setup_commands_and_ci_runs_the_test_one():
    cmds = setup_commands()
    assert len(cmds) == 2
    install_and_run, install_and_test = cmds
    assert "qtrain fit" in install_and_run and "pytest" in install_and_test
    assert install_and_test in (ROOT / ".ci" / "run").read_text()


def test_readme_splices_generated_tables(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "benchmarks" / "update_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "t.md").write_text("# Title\n\n| a |\n|---|\n| 1 |\n")
    out = mod.splice("x\n<!-- results:t -->\nold\n<!-- /results:t -->\ny", tmp_path)
    assert "### Title" in out and "old" not in out and out.startswith("x\n") and out.endswith("\ny")
