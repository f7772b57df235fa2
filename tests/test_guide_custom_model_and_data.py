"""docs/guide-custom-model-and-data.md works as written: its model, loader, config and script.

The page's blocks are written to a fresh folder, as a reader would save them, and
run from there: ``fedsim run`` (its entry point, ``fedsim.cli.main``, in this process)
finds the model and the loader through the current directory, and the page's script
runs in an interpreter of its own.
"""

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedsim.cli import main

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "guide-custom-model-and-data.md"
FILES = ("mymodels.py", "mydata.py", "run.py")  # the page's python blocks, in order


@pytest.fixture
def reader_folder(tmp_path: Path) -> Path:
    """A folder holding mymodels.py, mydata.py, lenet.toml and run.py from the guide."""
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", GUIDE.read_text(), re.MULTILINE | re.DOTALL)
    python = [code for language, code in blocks if language == "python"]
    (toml,) = [code for language, code in blocks if language == "toml"]
    assert len(python) == len(FILES)
    for name, code in zip(FILES, python, strict=True):
        (tmp_path / name).write_text(code)
    (tmp_path / "lenet.toml").write_text(toml)
    return tmp_path


@pytest.fixture
def in_reader_folder(reader_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in the reader's folder, as ``fedsim run`` there would; forget its modules afterwards."""
    monkeypatch.chdir(reader_folder)
    monkeypatch.setattr(sys, "path", list(sys.path))  # fedsim appends the current directory
    yield reader_folder
    for name in ("mymodels", "mydata"):
        sys.modules.pop(name, None)


def _fedsim_run(*sets: str) -> int:
    """``fedsim run lenet.toml --set ...``, the command's own entry point, in this process."""
    args = [a for s in ("progress=false", "plot=false", *sets) for a in ("--set", s)]
    return main(["run", "lenet.toml", *args])


def test_fedsim_run_trains_the_guides_lenet_on_its_loader(in_reader_folder: Path) -> None:
    assert _fedsim_run() == 0
    run = in_reader_folder / "runs" / "lenet"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2, 3]  # the initial model, then 3 rounds
    assert all(row["replies"] == 5 and row["failures"] == 0 for row in rows[1:])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["failures"] == 0
    assert summary["accuracy"] == rows[-1]["central_accuracy"] > 0.6  # the page says about 0.8
    model = torch.load(run / "model.pt")
    # The LeNet with [model.params] c1 = 6, c3 = 16, on the loader's (1, 8, 8) inputs.
    assert model["0.weight"].shape == (6, 1, 3, 3) and model["3.weight"].shape == (16, 6, 3, 3)
    assert model["7.weight"].shape == (120, 16) and model["11.weight"].shape == (10, 84)


def test_the_loaders_classes_reach_the_models_output_layer(in_reader_folder: Path) -> None:
    assert _fedsim_run("data.params.classes=5", "name=five", "rounds=1") == 0
    model = torch.load(in_reader_folder / "runs" / "five" / "model.pt")
    assert model["11.weight"].shape == (5, 84)


@pytest.mark.slow
def test_the_guides_script_runs_and_its_asserts_hold(reader_folder: Path) -> None:
    done = subprocess.run(
        [sys.executable, "run.py"], cwd=reader_folder, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "rotated nodes" in done.stdout


def _table_rows(page: str) -> list[tuple[str, str]]:
    """The page's table of mistakes: (the --set argument, fedsim's one line)."""
    return re.findall(r"^\| `--set ([^`]+)` \| `(fedsim: config error: [^`]+)`", page, re.MULTILINE)


MISTAKES = _table_rows(GUIDE.read_text())


def test_the_guides_table_of_mistakes_is_read_whole() -> None:
    assert len(MISTAKES) == 6  # a row this pattern missed would go untested


@pytest.mark.parametrize(("setting", "line"), MISTAKES, ids=[setting for setting, _ in MISTAKES])
def test_each_mistake_in_the_guide_is_the_one_line_it_shows(
    in_reader_folder: Path, capsys: pytest.CaptureFixture[str], setting: str, line: str
) -> None:
    assert main(["run", "lenet.toml", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.strip().startswith(line.removesuffix(", ...")), err
    assert not (in_reader_folder / "runs").exists()
