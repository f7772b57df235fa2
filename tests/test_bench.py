"""The engine benchmark: the floor is W1 itself, and the script's JSON has the promised shape."""

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "bench" / "engines.py"
if str(REPO) not in sys.path:  # experiments/ is not an installed package
    sys.path.insert(0, str(REPO))

from experiments.bench import measure, report, systems, systems_pfl  # noqa: E402
from experiments.bench.workload import WORKLOADS, cohort, initial_state, make_model  # noqa: E402

ROW_KEYS = {
    "system",
    "workload",
    "total_s",
    "steady_round_s",
    "peak_rss_mb",
    "total_ratio_to_floor",
    "steady_round_ratio_to_floor",
}


def _max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_w1_model_is_the_106k_parameter_cnn() -> None:
    assert sum(p.numel() for p in make_model().parameters()) == 105_866


def test_initial_state_is_fedsims_seeded_initialization() -> None:
    from fedsim.experiment import initial_arrays

    task = systems.w1_task()
    expected = initial_arrays(task, seed=3).to_torch_state_dict()
    assert _max_gap(initial_state(3), expected) == 0.0


def test_the_floor_samples_the_cohort_fedsims_fedavg_samples() -> None:
    from fedsim.engine import InlineGrid
    from fedsim.engine.nodes import FIRST_NODE_ID
    from fedsim.strategies import FedAvg

    workload = WORKLOADS["W1b"]
    grid = InlineGrid(systems.threads_reporting_app(systems.w1_task()), num_nodes=1000)
    strategy = FedAvg(seed=7, fraction_train=0.1, min_train_nodes=100, fraction_evaluate=0.0)
    for round_ in (1, 2, 5):
        messages = strategy.configure_train(
            round_, ArrayRecord(), systems.train_config(7, workload), grid
        )
        sampled = [m.metadata.dst_node_id - FIRST_NODE_ID for m in messages]
        assert cohort(workload, seed=7, round_=round_) == sampled


@pytest.mark.parametrize(
    "runner", [systems.run_inline, systems.run_threads], ids=["inline", "threads"]
)
def test_floor_and_fedsim_in_process_end_on_the_same_weights(runner: Callable) -> None:
    # Same cohorts, same batches, same float64 averaging: the floor is the same
    # workload as fedsim inline and threads, not a cheaper one.
    workload = WORKLOADS["W1a"]
    floor = systems.run_floor(workload, rounds=2, seed=1)
    fedsim = runner(workload, rounds=2, seed=1)
    assert floor.final_state is not None and fedsim.final_state is not None
    assert _max_gap(floor.final_state, fedsim.final_state) <= 1e-5
    assert _max_gap(floor.final_state, initial_state(1)) > 1e-3  # it did train
    assert len(floor.summary()["round_s"]) == len(fedsim.summary()["round_s"]) == 2


def test_pfl_trains_what_the_floor_trains() -> None:
    pytest.importorskip("pfl", reason="pfl comes with the bench extra: make bench")
    workload = WORKLOADS["W1a"]
    floor = systems.run_floor(workload, rounds=2, seed=0)
    pfl = systems_pfl.run_pfl(workload, rounds=2, seed=0)
    assert floor.final_state is not None and pfl.final_state is not None
    # pfl applies the mean update to the old model (float32) instead of averaging states.
    assert _max_gap(floor.final_state, pfl.final_state) <= 1e-5


def _row(system: str, workload: str, total: float, steady: float) -> dict:
    # One repetition; the floor's is total 10 s, steady round 1 s.
    return {
        "system": system,
        "workload": workload,
        "total_s": total,
        "steady_round_s": steady,
        "total_ratio_to_floor": total / 10.0,
        "steady_round_ratio_to_floor": steady / 1.0,
        "runs": [{"attempt": 0, "total_s": total, "steady_round_s": steady}],
    }


def test_targets_are_judged_from_the_measurements() -> None:
    rows = [
        _row("floor", "W1a", 10.0, 1.0),
        _row("inline", "W1a", 11.0, 1.2),  # total 1.10x passes, steady 1.20x fails
        _row("flower", "W1a", 30.0, 2.0),
        _row("pfl", "W1a", 10.0, 0.9),
    ]
    assert report.paired_ratios(rows[2]["runs"], rows[1]["runs"], "steady_round_s") == [2.0 / 1.2]
    scale = {
        "population-1e3": {"label": "1e3", "startup_s": 0.1, "peak_rss_mb": 300.0},
        "population-1e6": {"label": "1e6", "startup_s": 2.5, "peak_rss_mb": 350.0},
        "cohort-10": {"peak_rss_mb": 400.0},
        "cohort-500": {"peak_rss_mb": 600.0},
    }
    verdicts = [line.rsplit("  ", 1)[1] for line in report.targets(rows, scale)]
    assert verdicts == [
        "FAIL",  # steady 1.20x > 1.10x
        "PASS",  # total 1.10x <= 1.15x
        "PASS",  # inline 1.2 s < flower 2.0 s
        "FAIL",  # inline 1.2 s > pfl 0.9 s
        "n/a (not measured)",  # no threads row
        "n/a (not measured)",
        "n/a (not measured)",  # no ray row
        "n/a (not measured)",
        "PASS",  # start-up 0.1 s
        "FAIL",  # start-up 2.5 s
        "PASS",  # +50 MB
        "FAIL",  # 600 / 400 = 1.5
    ]


def test_median_interval_is_order_statistics_with_binomial_coverage() -> None:
    # 9 runs: 2nd smallest to 2nd largest, covering the median with 1 - 2 (1 + 9) / 2^9.
    low, high, coverage = report.median_interval([9, 1, 8, 2, 7, 3, 6, 4, 5])
    assert (low, high) == (2, 8) and coverage == pytest.approx(1 - 20 / 512)
    # 5 runs cannot reach 95%: min to max, 1 - 2 / 2^5.
    assert report.median_interval([3, 1, 2, 5, 4]) == (1, 5, pytest.approx(0.9375))
    assert report.median_interval([1.0]) is None


def test_median_interval_covers_the_median_as_often_as_it_claims() -> None:
    # Skewed draws (log-normal, median 1): over 4000 sets of 9, the share of intervals
    # holding 1 estimates the coverage with standard error sqrt(p (1 - p) / 4000) = 0.003.
    rng = np.random.default_rng(0)
    trials = 4000
    hits = 0
    for draws in rng.lognormal(0.0, 1.0, size=(trials, 9)):
        low, high, coverage = report.median_interval(draws.tolist())
        hits += low <= 1.0 <= high
    error = math.sqrt(coverage * (1 - coverage) / trials)
    assert abs(hits / trials - coverage) <= 4 * error


def test_a_verdict_within_the_noise_says_so() -> None:
    # Five paired runs whose steady ratios straddle 1.10: the median decides, the note warns.
    floor, inline = _row("floor", "W1a", 10.0, 1.0), _row("inline", "W1a", 10.0, 1.0)
    floor["runs"] = [{"attempt": i, "total_s": 10.0, "steady_round_s": 1.0} for i in range(5)]
    inline["runs"] = [
        {"attempt": i, "total_s": 10.0, "steady_round_s": s}
        for i, s in enumerate([1.04, 1.06, 1.08, 1.12, 1.14])
    ]
    steady = report.targets([floor, inline], {})[0]
    assert steady.endswith("PASS, within noise")
    assert "1.080x (94% interval 1.040-1.140, 5 runs)" in steady


def test_memory_sampling_counts_child_processes() -> None:
    # A child holding 200 MB must show up in the tree's resident set.
    code = (
        "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            tree = measure.process_tree(os.getpid())
            if child.pid in tree and measure.rss_bytes({child.pid}) > 200 * 2**20:
                break
            time.sleep(0.05)
        assert child.pid in tree
        assert measure.rss_bytes(tree) - measure.rss_bytes({os.getpid()}) > 200 * 2**20
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_the_script_writes_the_table_as_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--systems", "floor,inline", "--workloads", "W1a"]
    command += ["--rounds", "2", "--repeat", "1", "--no-scale", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "TARGETS" in done.stdout and "fedsim inline" in done.stdout
    rows = json.loads(out.read_text())
    assert [(r["system"], r["workload"]) for r in rows] == [("floor", "W1a"), ("inline", "W1a")]
    for row in rows:
        assert ROW_KEYS <= row.keys()
        for key in ROW_KEYS - {"system", "workload"}:
            assert isinstance(row[key], float) and row[key] > 0, (key, row[key])
        assert len(row["runs"][0]["round_s"]) == 2
    floor, inline = rows
    assert floor["total_ratio_to_floor"] == floor["steady_round_ratio_to_floor"] == 1.0
    assert inline["max_abs_diff_to_floor"] <= 1e-5


def test_pfl_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without pfl the runner says how to get it instead of failing the benchmark.
    # A None entry in sys.modules makes `import pfl` raise ImportError, as if absent.
    for name in [m for m in sys.modules if m == "pfl" or m.startswith("pfl.")] + ["pfl"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(systems.SystemUnavailable, match=r"\.\[bench\]"):
        systems_pfl.run_pfl(WORKLOADS["W1a"], rounds=1, seed=0)
