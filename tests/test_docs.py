"""The guides' code runs as written: every ```python block of docs/*.md, in a fresh interpreter.

A fresh interpreter per page, because a page may start Ray or change torch's threads;
fragments that are not whole programs are fenced without a language.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Pages whose code needs more than one script (files saved side by side) have tests of their own.
OWN_TESTS = {"custom-strategy.md"}
PAGES = sorted(p for p in (REPO / "docs").glob("*.md") if p.name not in OWN_TESTS)
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(page: Path) -> list[str]:
    """Return the page's ```python blocks, in order."""
    return _BLOCK.findall(page.read_text())


def test_the_engines_page_shows_every_engine_in_code() -> None:
    (code,) = python_blocks(REPO / "docs" / "engines.md")
    for constructor in ("InlineGrid(", "ThreadedGrid(", "RayGrid("):
        assert constructor in code


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_every_python_block_of_a_page_runs(page: Path, tmp_path: Path) -> None:
    script = tmp_path / f"{page.stem}.py"
    script.write_text("\n\n".join(python_blocks(page)))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
