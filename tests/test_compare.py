"""Finished runs side by side: ``fedsim.load_run``, ``fedsim compare`` and ``fedsim sweep``.

Most run folders here are written by hand (config.json, metrics.jsonl, summary.json),
so every number in the table is known in advance; the sweep runs two real tiny runs.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import fedsim
from fedsim.cli import EXIT_BAD_INPUT, EXIT_FAILED, main
from fedsim.compare import RunFolderError, best_value, curves_of, final_value, load_run
from fedsim.sweep import parse_grid, plan_sweep, point_name
from tests.conftest import DEMO_CONFIG

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The server's accuracy rises, falls back; its loss falls, rises: final and best differ.
ROWS_A = [
    {"round": 0, "elapsed_s": 0.0, "central_accuracy": 0.1, "central_loss": 2.0},
    {"round": 1, "elapsed_s": 1.0, "central_accuracy": 0.5, "central_loss": 1.0,
     "evaluate_accuracy": 0.9},
    {"round": 2, "elapsed_s": 2.0, "central_accuracy": 0.4, "central_loss": 1.5},
]  # fmt: skip
# No server test set: the clients' accuracy; central DP's epsilon; simulated devices.
ROWS_B = [
    {"round": 0, "elapsed_s": 0.0, "simulated_s": None},
    {"round": 1, "elapsed_s": 0.5, "simulated_s": 3.0, "evaluate_accuracy": 0.2,
     "evaluate_loss": 1.8, "privacy_epsilon": 0.5},
    {"round": 2, "elapsed_s": 1.0, "simulated_s": 4.0, "evaluate_accuracy": 0.3,
     "evaluate_loss": 1.7, "privacy_epsilon": 1.25},
]  # fmt: skip
SMALL = ("rounds=2", "data.num_clients=10", "strategy.clients_per_round=2",
         "client.local_epochs=1", "model.name=logreg", "progress=false", "plot=false")  # fmt: skip


def write_run(
    folder: Path, rows: list[dict[str, Any]], *, dataset: str = "digits", **summary: Any
) -> Path:
    """Write a run folder by hand: config.json, metrics.jsonl and (given) summary.json."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"name": folder.name, "data": {"dataset": dataset}})
    )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if summary:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def table_rows(printed: str) -> dict[str, list[str]]:
    """Return the printed comparison table's cells by run: {run: [rounds, final acc, ...]}."""
    cells = [line.split("│")[1:-1] for line in printed.splitlines() if "│" in line]
    return {row[0].strip(): [cell.strip() for cell in row[1:]] for row in cells}


def test_load_run_gives_config_summary_and_a_dataframe_of_the_rounds(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    folder = write_run(tmp_path / "a", ROWS_A, status="completed", wall_time_s=2.5)

    run = fedsim.load_run(folder)

    assert run.config == {"name": "a", "data": {"dataset": "digits"}}
    assert run.summary == {"status": "completed", "wall_time_s": 2.5}
    assert isinstance(run.metrics, pd.DataFrame)
    assert list(run.metrics["round"]) == [0, 1, 2]
    assert list(run.metrics["central_accuracy"]) == [0.1, 0.5, 0.4]
    assert run.rows == ROWS_A


def test_without_pandas_load_run_gives_the_rows_as_dicts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_run(tmp_path / "b", ROWS_B)  # no summary.json: a run that was killed
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError

    run = load_run(folder)

    assert run.metrics == ROWS_B
    assert run.summary == {}


def test_import_fedsim_stays_light() -> None:
    code = "import sys, fedsim; print(sorted({'torch', 'flwr', 'pandas'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


def test_a_folder_without_a_run_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(RunFolderError, match=f"^{tmp_path}/ holds no fedsim run"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunFolderError, match="its config.json is missing$"):
        load_run(tmp_path)


def test_curves_take_the_servers_metrics_else_the_clients_with_final_and_best(
    tmp_path: Path,
) -> None:
    a = curves_of(load_run(write_run(tmp_path / "a", ROWS_A)), "a")
    b = curves_of(load_run(write_run(tmp_path / "b", ROWS_B)), "b")

    assert (final_value(a.task), best_value(a.task, a.metric)) == (0.4, 0.5)  # not 0.9: central
    assert (final_value(a.loss), best_value(a.loss, "loss")) == (1.5, 1.0)
    assert (final_value(b.task), best_value(b.task, b.metric)) == (0.3, 0.3)
    assert final_value(b.epsilon) == 1.25 and a.epsilon == []
    assert [(p[0], p[2]) for p in b.simulated] == [(0, 0.0), (1, 3.0), (2, 7.0)]  # summed
    assert (a.rounds, a.wall_s, b.wall_s) == (2, 2.0, 1.0)  # no summary: the last elapsed_s


def test_compare_prints_each_runs_table_row_and_writes_one_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path / "a", ROWS_A, wall_time_s=2.5)
    write_run(tmp_path / "b", ROWS_B)
    out = tmp_path / "plots" / "both.png"

    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0

    rows = table_rows(capsys.readouterr().out)
    # rounds, final and best accuracy, final and best loss, final ε, wall time (s)
    assert rows["a"] == ["2", "0.4000", "0.5000", "1.5000", "1.0000", "-", "2.50"]
    assert rows["b"] == ["2", "0.3000", "0.3000", "1.7000", "1.7000", "1.2500", "1.00"]
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_compare_refuses_runs_on_different_datasets_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = str(write_run(tmp_path / "a", ROWS_A))
    b = str(write_run(tmp_path / "b", ROWS_B, dataset="mnist"))
    out = tmp_path / "c.png"

    assert main(["compare", a, b, "--out", str(out)]) == EXIT_BAD_INPUT

    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"fedsim compare: {b}/ used data.dataset = 'mnist' but {a}/ used 'digits'; "
        "pass --allow-different-datasets to compare them anyway"
    )
    assert not out.exists()
    assert main(["compare", a, b, "--out", str(out), "--allow-different-datasets"]) == 0
    assert out.exists()


def test_compare_of_a_folder_without_a_run_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", str(tmp_path / "absent"), "--out", str(tmp_path / "c.png")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"fedsim compare: {tmp_path / 'absent'}/ holds no fedsim run")


def test_grid_values_split_at_commas_outside_quotes_and_name_safe_folders() -> None:
    grid = parse_grid(["data.alpha=0.1, 1.0", 'faults.kinds="raise,nan",hang'])

    assert grid == [("data.alpha", ["0.1", "1.0"]), ("faults.kinds", ['"raise,nan"', "hang"])]
    settings = ["data.alpha=0.1", 'faults.kinds="raise,nan"']
    assert point_name("demo", settings) == "demo-data.alpha_0.1-faults.kinds_raise_nan"


EXPECTED = "expected KEY=V1,V2,..., e.g. --grid data.alpha=0.1,1.0"


@pytest.mark.parametrize(
    ("grid", "start"),
    [
        (["--grid", "client.lr"], f"--grid 'client.lr': {EXPECTED}"),
        (["--grid", "client.lr=0.1,,0.2"], f"--grid 'client.lr=0.1,,0.2': {EXPECTED}"),
        (["--grid", "client.lrr=0.1"], "unknown key 'client.lrr' (did you mean 'client.lr'?)"),
        # The last point is bad: the first must not have run either.
        (["--grid", "client.lr=0.1,-1"], "client.lr = -1.0 is out of range"),
        (["--grid", "name=a,b"], "--grid name: a sweep names each run after its settings"),
        ([], "--grid: give at least one"),
    ],
)
def test_a_bad_grid_is_one_line_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], grid: list[str], start: str
) -> None:
    sets = [arg for setting in (f"output_dir={tmp_path}", *SMALL) for arg in ("--set", setting)]

    assert main(["sweep", DEMO_CONFIG, *grid, *sets]) == EXIT_BAD_INPUT

    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"fedsim: config error: {start}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("address", "joined"), [("", "auto"), ("ray://head:10001", "ray://head:10001")]
)
def test_engine_cluster_runs_each_point_on_ray_joining_the_configs_cluster(
    tmp_path: Path, address: str, joined: str
) -> None:
    sets = [f"output_dir={tmp_path}", f'engine.address="{address}"', *SMALL]

    sweep = plan_sweep(DEMO_CONFIG, ["seed=1,2"], sets, engine_cluster=True)

    engines = [(p.config.engine.name, p.config.engine.address) for p in sweep.points]
    assert engines == [("ray", joined), ("ray", joined)]


def test_a_sweep_runs_each_point_goes_on_past_a_failure_and_compares_those_that_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A 2 x 1 grid; the first point's device profiles do not exist, so that run fails.
    grid = ["--grid", 'devices.csv=missing.csv,""', "--grid", "seed=3"]
    sets = [arg for setting in (f"output_dir={tmp_path}", "devices.enabled=true", *SMALL)
            for arg in ("--set", setting)]  # fmt: skip

    assert main(["sweep", DEMO_CONFIG, *grid, *sets]) == EXIT_FAILED

    failed, ran = "demo-devices.csv_missing.csv-seed_3", tmp_path / "demo-devices.csv_-seed_3"
    assert not (tmp_path / failed).exists()  # it failed before its first round
    summary = json.loads((ran / "summary.json").read_text())
    assert (summary["status"], summary["rounds"], summary["seed"]) == ("completed", 2, 3)
    captured = capsys.readouterr()
    assert f"sweep 1/2: {failed} failed: ValueError: missing.csv" in captured.err
    assert captured.err.splitlines()[-1] == f"fedsim sweep: 1 run(s) failed: {failed}"
    rows = table_rows(captured.out)
    assert list(rows) == [ran.name]
    assert rows[ran.name][:2] == ["2", f"{summary['accuracy']:.4f}"]  # rounds, final accuracy
    assert (tmp_path / "demo-sweep" / "compare.png").read_bytes().startswith(PNG_MAGIC)
