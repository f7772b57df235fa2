"""docs/custom-strategy.md works as written: its FedProx module, config, commands and test.

The page's blocks are written to a fresh folder, as a reader would save them, and
run from there: the plug-in is found through the current directory.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "custom-strategy.md"


@pytest.fixture
def reader_folder(tmp_path: Path) -> Path:
    """A folder holding fedprox.py, fedprox.toml and check.py from the guide."""
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", GUIDE.read_text(), re.MULTILINE | re.DOTALL)
    python = [code for language, code in blocks if language == "python"]
    (toml,) = [code for language, code in blocks if language == "toml"]
    module, check = python
    (tmp_path / "fedprox.py").write_text(module)
    (tmp_path / "fedprox.toml").write_text(toml)
    (tmp_path / "check.py").write_text(check)
    return tmp_path


def _fedsim(folder: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    args = [a for s in ("progress=false", "plot=false", *sets) for a in ("--set", s)]
    return subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", "fedprox.toml", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _completed(folder: Path, name: str) -> dict:
    summary = json.loads((folder / "runs" / name / "summary.json").read_text())
    rows = (folder / "runs" / name / "metrics.jsonl").read_text().splitlines()
    assert summary["status"] == "completed" and summary["failures"] == 0, summary
    assert len(rows) == 4  # round 0 and three rounds
    return summary


def test_the_guides_plugin_runs_with_fedsim_run_and_its_test_passes(reader_folder: Path) -> None:
    done = _fedsim(reader_folder)
    assert done.returncode == 0, done.stderr[-3000:]
    _completed(reader_folder, "fedprox")
    check = subprocess.run(
        [sys.executable, "check.py"], cwd=reader_folder, capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 0, check.stderr[-3000:]


def test_the_guides_plugin_runs_under_central_dp_and_reports_its_epsilon(
    reader_folder: Path,
) -> None:
    done = _fedsim(reader_folder, "privacy.central_dp=true", "name=central-dp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _completed(reader_folder, "central-dp")["epsilon"] > 0


@pytest.mark.slow
def test_the_guides_plugin_runs_on_the_ray_engine(reader_folder: Path) -> None:
    done = _fedsim(reader_folder, "engine.name=ray", "engine.num_actors=2", "name=on-ray")
    assert done.returncode == 0, done.stderr[-3000:]
    _completed(reader_folder, "on-ray")


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            "strategy.params.m=0.1",
            "unknown parameter 'strategy.params.m' (did you mean 'strategy.params.mu'?)",
        ),
        ('strategy.params.mu="big"', "strategy.params.mu = 'big' must be a number"),
        ("strategy.name=fedprox:FedProxx", "'fedprox' has no 'FedProxx'"),
        ("strategy.name=fedprocs:FedProx", "cannot import 'fedprocs'"),
        ("client.dp_sgd=true", "client.dp_sgd = true is refused"),
        ("privacy.local_dp=true", "privacy.local_dp = true is refused"),
    ],
)
def test_a_bad_plugin_setting_is_one_line_naming_it(
    reader_folder: Path, setting: str, expected: str
) -> None:
    done = _fedsim(reader_folder, setting)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert expected in done.stderr, done.stderr
    assert not (reader_folder / "runs").exists()
