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


@pytest.mark.slow
def test_quick_run_writes_table_figures_and_raw_results(tmp_path: Path) -> None:
    done = run_script(SCRIPT, "--quick", "--out", str(tmp_path))

    for name in ("table.csv", "table.md", "verdict.txt", "fig2_vs_q.png", "fig4_vs_rounds.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with (tmp_path / "table.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert sorted((r["method"], float(r["q"])) for r in rows) == sorted(
        (m, q) for m in METHODS for q in QUICK_QS
    )
    for row in rows:
        assert all(math.isfinite(float(row[key])) for key in NUMBERS), row
    assert "BVR-L-SGD" in (tmp_path / "table.md").read_text()

    raw = json.loads((tmp_path / "results.json").read_text())
    rounds = raw["settings"]["rounds"]
    assert len(raw["runs"]) == len(METHODS) * len(QUICK_QS) * 2  # 2 step sizes, 1 seed
    for run in raw["runs"]:
        assert run["round"] == list(range(rounds + 1))
        assert len(run["train_loss"]) == len(run["uplink_floats"]) == rounds + 1
        assert run["exchanges"][1:] == [2 if run["method"] == "bvr-l-sgd" else 1] * rounds
    assert "elapsed:" in done.stdout
