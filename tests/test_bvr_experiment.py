"""The BVR-L-SGD heterogeneity experiment runs end to end and writes what it promises."""

import csv
import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "bvr_heterogeneity.py"
METHODS = {"minibatch-sgd", "sarah", "local-sgd", "scaffold", "bvr-l-sgd"}
QUICK_QS = {0.0, 1.0}
NUMBERS = (
    "lr",
    "val_loss",
    "train_loss",
    "train_loss_std",
    "test_accuracy",
    "test_accuracy_std",
    "final_test_accuracy",
    "final_test_accuracy_std",
    "exchanges",
    "uplink_floats",
    "downlink_floats",
)


RESULT = '{"runs": []}'  # what the refusals must leave as it is


@pytest.mark.slow
def test_quick_run_writes_table_figures_and_raw_results(tmp_path: Path) -> None:
    # As a user runs it, where a full sweep and an earlier smoke test left results:
    # the smoke test replaces its own, in runs/bvr_heterogeneity-quick/, and no other.
    full = tmp_path / "runs" / "bvr_heterogeneity"
    quick = tmp_path / "runs" / "bvr_heterogeneity-quick"
    for folder in (full, quick):
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(RESULT)

    done = run_script(SCRIPT, "--quick", cwd=tmp_path)

    assert [p.name for p in full.iterdir()] == ["results.json"]
    assert (full / "results.json").read_text() == RESULT
    for name in ("table.csv", "table.md", "verdict.txt", "fig2_vs_q.png", "fig4_vs_rounds.png"):
        assert (quick / name).stat().st_size > 0, name
    with (quick / "table.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert sorted((r["method"], float(r["q"])) for r in rows) == sorted(
        (m, q) for m in METHODS for q in QUICK_QS
    )
    for row in rows:
        assert all(math.isfinite(float(row[key])) for key in NUMBERS), row
    assert "BVR-L-SGD" in (quick / "table.md").read_text()

    raw = json.loads((quick / "results.json").read_text())
    rounds = raw["settings"]["rounds"]
    assert len(raw["runs"]) == len(METHODS) * len(QUICK_QS) * 2  # 2 step sizes, 1 seed
    for run in raw["runs"]:
        assert run["round"] == list(range(rounds + 1))
        assert len(run["train_loss"]) == len(run["uplink_floats"]) == rounds + 1
        assert run["exchanges"][1:] == [2 if run["method"] == "bvr-l-sgd" else 1] * rounds
    assert "elapsed:" in done.stdout


@pytest.mark.parametrize("quick", [[], ["--quick"]], ids=["full", "quick"])
def test_a_result_in_out_is_kept_without_overwrite(tmp_path: Path, quick: list[str]) -> None:
    (tmp_path / "results.json").write_text(RESULT)

    done = run_script(SCRIPT, *quick, "--out", str(tmp_path), returncode=2)

    assert done.stderr.strip() == (
        f"bvr_heterogeneity.py: {tmp_path}/ already holds a result; "
        "pass --overwrite to replace it or --out to write elsewhere"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert (tmp_path / "results.json").read_text() == RESULT
