"""The guides' code runs as written, and their links lead somewhere.

Every ```python block of docs/*.md runs in a fresh interpreter, and so does README.md's
example. A fresh interpreter per page, because a page may start Ray or change torch's
threads; fragments that are not whole programs are fenced without a language.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# Pages whose code needs more than one script (files saved side by side) have tests of their own.
OWN_TESTS = {"custom-strategy.md", "guide-custom-model-and-data.md"}
PAGES = sorted(p for p in (REPO / "docs").glob("*.md") if p.name not in OWN_TESTS)
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_FENCE = re.compile(r"^\s*```.*?^\s*```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def python_blocks(page: Path) -> list[str]:
    """Return the page's ```python blocks, in order."""
    return _BLOCK.findall(page.read_text())


def run_blocks(page: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the page's python blocks as one script in a fresh interpreter, in ``tmp_path``."""
    script = tmp_path / f"{page.stem}.py"
    script.write_text("\n\n".join(python_blocks(page)))
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


def test_the_engines_page_shows_every_engine_in_code() -> None:
    (code,) = python_blocks(REPO / "docs" / "engines.md")
    for constructor in ("InlineGrid(", "ThreadedGrid(", "RayGrid("):
        assert constructor in code


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_every_python_block_of_a_page_runs(page: Path, tmp_path: Path) -> None:
    done = run_blocks(page, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_the_readme_example_runs(tmp_path: Path) -> None:
    """README.md's example: a PyTorch model trained with FedAvg on the inline engine."""
    (code,) = python_blocks(README)
    for name in ("TorchTask(", "make_client_app(", "InlineGrid(", "FedAvg("):
        assert name in code
    done = run_blocks(README, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "test accuracy" in done.stdout


def test_the_readme_is_a_front_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for command in ("make demo", "make test"):
        assert command in text


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, '-' for ' '."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", _FENCE.sub("", page.read_text()), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


@pytest.mark.parametrize(
    "page", [README, *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name
)
def test_every_relative_link_leads_to_a_file_and_heading(page: Path) -> None:
    text = re.sub(r"`[^`\n]*`", "", _FENCE.sub("", page.read_text()))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if "shared" in Path(path).parts or not resolved.is_relative_to(REPO):
            broken.append(f"{target} (outside the repository's own files)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: " + ", ".join(broken)
