"""Splice the generated Markdown tables of benchmarks/results/ into README.md and benchmarks/README.md between
their markers.

    python benchmarks/update_readme.py

A marker pair ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` receives ``results/NAME.md`` (its
first heading demoted to ###). Tables in the READMEs are never typed by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def splice(readme: str, results: Path, base: Path = ROOT) -> str:
    """``readme`` with every marker pair filled; image links made relative to ``base`` (the README's folder)."""
    def repl(m: re.Match) -> str:
        name = m.group(1)
        f = results / f"{name}.md"
        if not f.is_file():
            f = results / name / "report.md"  # a `qtrain bench` result directory
        if not f.is_file():
            return m.group(0)
        body = re.sub(r"^# ", "### ", f.read_text().strip(), count=1)
        # images are linked relative to their Markdown file; rewrite them relative to the README's folder
        where = f.parent.resolve()
        where = where.relative_to(base).as_posix() if where.is_relative_to(base) else where.as_posix()
        body = re.sub(r"\]\((?!https?:|/)([^)]+\.png)\)", lambda g: f"]({where}/{g.group(1)})", body)
        return f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"

    return re.sub(r"<!-- results:([\w./-]+) -->.*?<!-- /results:\1 -->", repl, readme, flags=re.S)


def main() -> None:
    from qtrain.io import atomic_write_text

    for readme in (ROOT / "README.md", ROOT / "benchmarks" / "README.md"):
        if readme.is_file():
            atomic_write_text(readme, splice(readme.read_text(), ROOT / "benchmarks" / "results", readme.parent))


if __name__ == "__main__":
    main()
