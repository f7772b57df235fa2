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


RESULT = '{"runs": []}'  # what the refusals must leave as it is


@pytest.mark.slow
def test_quick_run_writes_table_plot_and_raw_results(tmp_path: Path) -> None:
    # As a user runs it, where a full sweep and an earlier smoke test (one of its runs
    # too) left results: the smoke test replaces its own, and no other.
    full = tmp_path / "runs" / "privacy_utility"
    quick = tmp_path / "runs" / "privacy_utility-quick"
    stale_run = quick / "runs" / "none-seed0"
    for folder in (full, quick, stale_run):
        folder.mkdir(parents=True, exist_ok=True)
    (full / "results.json").write_text(RESULT)
    (quick / "results.json").write_text(RESULT)
    (stale_run / "summary.json").write_text('{"status": "completed"}')

    done = run_script(SCRIPT, "--quick", cwd=tmp_path)

    assert [p.name for p in full.iterdir()] == ["results.json"]
    assert (full / "results.json").read_text() == RESULT
    assert json.loads((stale_run / "summary.json").read_text())["rounds"] > 0
    for name in ("table.csv", "table.md", "privacy_utility.png", "results.json"):
        assert (quick / name).stat().st_size > 0, name
    with (quick / "table.csv").open() as file:
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
    table = (quick / "table.md").read_text()
    for label in ("no DP", "central DP", "local DP", "local + central DP"):
        assert f"| {label} |" in table

    raw = json.loads((quick / "results.json").read_text())
    assert len(raw["runs"]) == len(EXPECTED_ROWS)  # one seed
    for run in raw["runs"]:
        assert len(run["accuracy_per_round"]) == raw["settings"]["rounds"] + 1
        assert math.isfinite(run["accuracy"])
    assert "elapsed:" in done.stdout


def test_a_result_in_out_is_kept_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(RESULT)

    done = run_script(SCRIPT, "--out", str(tmp_path), returncode=2)

    assert done.stderr.strip() == (
        f"privacy_utility.py: {tmp_path}/ already holds a result; "
        "pass --overwrite to replace it or --out to write elsewhere"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert (tmp_path / "results.json").read_text() == RESULT
