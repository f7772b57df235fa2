"""The privacy-utility experiment runs end to end and writes what it promises."""

import csv
import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "privacy_utility.py"
CENTRAL_EPSILONS = {1.0, 2.0, 4.0, 8.0}
DIRECTION_EPSILONS = {2.0, 4.0, 8.0, 16.0}
EXPECTED_ROWS = sorted(
    [("none", None)]
    + [("central", e) for e in CENTRAL_EPSILONS]
    + [("ldp", e) for e in DIRECTION_EPSILONS]
    + [("ldp+central", e) for e in CENTRAL_EPSILONS],
    key=str,
)


def _sweep(value: str) -> float | None:
    return float(value) if value else None


@pytest.mark.slow
def test_quick_run_writes_table_plot_and_raw_results(tmp_path: Path) -> None:
    done = run_script(SCRIPT, "--quick", "--out", str(tmp_path))

    for name in ("table.csv", "table.md", "privacy_utility.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    with (tmp_path / "table.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert sorted(((r["mechanism"], _sweep(r["sweep_epsilon"])) for r in rows), key=str) == (
        EXPECTED_ROWS
    )
    for row in rows:
        assert math.isfinite(float(row["final_accuracy"])), row
        assert 0 <= float(row["final_accuracy"]) <= 1, row
        if "central" in row["mechanism"]:
            # The run's accountant reports the ε that z was calibrated for.
            target, reported = float(row["sweep_epsilon"]), float(row["central_epsilon"])
            assert target - 0.05 <= reported <= target, row
    table = (tmp_path / "table.md").read_text()
    for label in ("no DP", "central DP", "local DP", "local + central DP"):
        assert f"| {label} |" in table

    raw = json.loads((tmp_path / "results.json").read_text())
    assert len(raw["runs"]) == len(EXPECTED_ROWS)  # one seed
    for run in raw["runs"]:
        assert len(run["accuracy_per_round"]) == raw["settings"]["rounds"] + 1
        assert math.isfinite(run["accuracy"])
    assert "elapsed:" in done.stdout
