"""Metric sinks log what metrics.jsonl holds, read back through each tool's own reader.

Each tool test runs a tiny real run with its sink on and reads the values back:
TensorBoard's event files through its ``EventAccumulator``, the W&B offline run's
transaction log, MLflow's file store through ``MlflowClient``. A missing package
stops the run before any work, in one line naming the extra.
"""

import importlib.util
import json
import os
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedsim.cli import EXIT_BAD_INPUT, main
from fedsim.config import ConfigError, RunConfig, flatten, load_config
from fedsim.loop import RoundReport
from fedsim.runner import run_experiment
from fedsim.sinks import ENVIRONMENT, MetricSink, Status
from tests.conftest import DEMO_CONFIG

SMALL = (
    "output_dir={tmp}",
    "name=run",
    "rounds=2",
    "data.num_clients=10",
    "strategy.clients_per_round=2",
    "client.local_epochs=1",
    "model.name=logreg",
    "progress=false",
    "plot=false",
)
SINKS = ("tensorboard", "wandb", "mlflow")


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [override.format(tmp=tmp_path) for override in SMALL] + list(extra)


def _config(tmp_path: Path, *extra: str) -> RunConfig:
    return load_config(DEMO_CONFIG, _overrides(tmp_path, *extra))


def _expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Each numeric column of metrics.jsonl as (round, value) pairs, round order."""
    columns: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if number and key not in ("round", "num_rounds"):
                columns.setdefault(key, []).append((row["round"], value))
    return columns


def _children() -> list[str]:
    """Command lines of this process's live child processes (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue  # the process ended meanwhile
        if int(parent) == os.getpid() and state != "Z":
            found.append(command)
    return found


def _needs(package: str) -> None:
    """Skip unless ``package`` is installed; unlike ``importorskip``, do not import it.

    A sink sets the package's ``ENVIRONMENT`` before importing it (MLflow decides on
    its telemetry at import), so the test imports it only after the run.
    """
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"logging.{package} needs fedsim[{package}]")


@pytest.fixture
def sink_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset the variables the sinks default for the test; W&B's service logs in tmp_path."""
    for name in {name for defaults in ENVIRONMENT.values() for name in defaults}:
        monkeypatch.setenv(name, "")  # recorded, so that what a sink sets is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


class _Writer:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.closed: list[Status] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, metrics))

    def close(self, status: Status) -> None:
        self.closed.append(status)


def _sink() -> tuple[MetricSink, list[_Writer]]:
    opened: list[_Writer] = []

    def open_writer() -> _Writer:
        opened.append(_Writer())
        return opened[-1]

    return MetricSink(open_writer), opened


def test_a_sink_holds_round_0_until_a_round_has_run_then_logs_numbers_at_step_round() -> None:
    sink, opened = _sink()
    with sink:
        sink.on_round(RoundReport(round=0, num_rounds=2, central={"accuracy": 0.1}))
        assert opened == []  # a run that fails now has written nothing
        sink.on_round(RoundReport(round=1, num_rounds=2, train={"loss": 2.0}, replies=3))
    (writer,) = opened
    assert [step for step, _ in writer.logged] == [0, 1]
    assert writer.logged[0][1]["central_accuracy"] == 0.1
    round_1 = writer.logged[1][1]
    assert round_1["train_loss"] == 2.0 and round_1["replies"] == 3.0
    assert "round" not in round_1 and "num_rounds" not in round_1
    assert "simulated_s" not in round_1  # None: no simulated devices
    assert writer.closed == ["finished"]


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError, "failed"), (KeyboardInterrupt, "interrupted")]
)
def test_a_sink_closes_with_the_way_the_run_ended(error: type[BaseException], status: str) -> None:
    sink, opened = _sink()
    with pytest.raises(error), sink:
        sink.on_round(RoundReport(round=1, num_rounds=2))
        raise error
    assert opened[0].closed == [status]


def test_a_sink_that_never_opened_closes_nothing() -> None:
    sink, opened = _sink()
    with pytest.raises(RuntimeError), sink:
        sink.on_round(RoundReport(round=0, num_rounds=2))
        raise RuntimeError("round 1 failed")
    assert opened == []


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def _assert_float32_equal(
    logged: dict[str, list[tuple[int, float]]], expected: dict[str, list[tuple[int, float]]]
) -> None:
    assert logged.keys() == expected.keys()
    for key, pairs in expected.items():
        assert [step for step, _ in logged[key]] == [step for step, _ in pairs], key
        values = [value for _, value in pairs]
        assert [value for _, value in logged[key]] == pytest.approx(values, rel=1e-6), key


@pytest.mark.usefixtures("sink_env")
def test_tensorboard_event_files_hold_every_round_of_metrics_jsonl(tmp_path: Path) -> None:
    _needs("tensorboard")
    config = _config(tmp_path, "logging.tensorboard=true")

    run_experiment(config)

    expected = _expected(config.run_dir)
    assert [step for step, _ in expected["central_accuracy"]] == [0, 1, 2]
    _assert_float32_equal(_scalars(config.run_dir / "tb"), expected)  # TensorBoard keeps float32


def _wandb_records(path: Path) -> Iterator[Any]:
    """Parse a W&B transaction log (``run-<id>.wandb``) into its protobuf records.

    W&B 0.31 writes it from its Go service and ships no Python reader. The format
    is LevelDB's log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then
    32 KiB blocks of chunks, each a 7-byte header (CRC-32, length, type: 1 full,
    2 first, 3 middle, 4 last) and its bytes; a block's tail under 7 bytes is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    position, block, record = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        record += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            record = b""
            yield parsed


def _wandb_run(folder: Path) -> tuple[Any, dict[str, Any], dict[int, dict[str, Any]]]:
    """Return an offline run's run record, config and history rows by step."""
    (log,) = folder.glob("run-*.wandb")
    run, config, history = None, {}, {}
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config = {_key(item): json.loads(item.value_json) for item in run.config.update}
        elif kind == "history":
            items = {_key(item): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {
                key: value for key, value in items.items() if not key.startswith("_")
            }
    return run, config, history


def _key(item: Any) -> str:
    """A config or history item's key: ``key``, or its ``nested_key`` parts joined by '/'."""
    return item.key or "/".join(item.nested_key)


def _wandb_columns(history: dict[int, dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    columns: dict[str, list[tuple[int, float]]] = {}
    for step, row in sorted(history.items()):
        for key, value in row.items():
            columns.setdefault(key, []).append((step, value))
    return columns


@pytest.mark.usefixtures("sink_env")
def test_a_wandb_offline_run_holds_the_config_and_every_round_and_no_process_is_left(
    tmp_path: Path,
) -> None:
    _needs("wandb")
    config = _config(tmp_path, "logging.wandb=true")

    run_experiment(config)

    (folder,) = (config.run_dir / "wandb").glob("offline-run-*")
    run, logged_config, history = _wandb_run(folder)
    assert (run.project, run.display_name) == ("fedsim", "run")
    assert logged_config["rounds"] == 2 and logged_config["logging"]["wandb"] is True
    assert logged_config["data"]["num_clients"] == 10
    assert _wandb_columns(history) == _expected(config.run_dir)  # JSON doubles: exact
    assert not [command for command in _children() if "wandb" in command]


def _mlflow_run(run_dir: Path) -> tuple[Any, Any]:
    """Return a client of the run folder's MLflow store and the one run of its experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("fedsim")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


@pytest.mark.usefixtures("sink_env")
def test_an_mlflow_run_holds_the_flat_config_as_params_and_every_round(tmp_path: Path) -> None:
    _needs("mlflow")
    config = _config(tmp_path, "logging.mlflow=true")

    run_experiment(config)

    from mlflow.telemetry import get_telemetry_client

    assert get_telemetry_client() is None  # the sink turned MLflow's usage telemetry off
    client, run = _mlflow_run(config.run_dir)
    assert (run.info.run_name, run.info.status) == ("run", "FINISHED")
    assert run.data.params == {key: str(value) for key, value in flatten(config).items()}
    expected = _expected(config.run_dir)
    logged = {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in run.data.metrics
    }
    assert logged == expected


@pytest.mark.usefixtures("sink_env")
def test_a_resumed_run_appends_to_its_sinks(tmp_path: Path) -> None:
    for package in SINKS:
        _needs(package)
    sinks = [f"logging.{package}=true" for package in SINKS]
    # Saved at round 2 only: the resumed run reruns round 3, which the first run had logged.
    run_experiment(_config(tmp_path, "rounds=3", "checkpoint_every=2", *sinks))
    time.sleep(1)  # W&B names an offline run's folder by the second it starts, and its id
    config = _config(tmp_path, "rounds=4", "checkpoint_every=2", *sinks)

    run_experiment(config, resume=True)

    expected = _expected(config.run_dir)
    assert [step for step, _ in expected["central_accuracy"]] == [0, 1, 2, 3, 4]
    # TensorBoard: the first run's round 3 is purged from view, the rerun's shown.
    _assert_float32_equal(_scalars(config.run_dir / "tb"), expected)
    # W&B: a second offline run with the first one's id, from round 3 on.
    first, second = sorted((config.run_dir / "wandb").glob("offline-run-*"))
    assert first.name.rsplit("-", 1)[1] == second.name.rsplit("-", 1)[1]
    assert sorted(_wandb_run(second)[2]) == [3, 4]
    # MLflow: the same run continues; round 3 is in its history twice.
    client, run = _mlflow_run(config.run_dir)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "central_accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 3, 4]
    assert not [command for command in _children() if "wandb" in command]


@pytest.mark.usefixtures("sink_env")
@pytest.mark.parametrize("package", SINKS)
def test_a_missing_package_stops_the_run_before_any_work_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    config = _config(tmp_path, f"logging.{package}=true")

    with pytest.raises(ConfigError) as refused:
        run_experiment(config)

    assert str(refused.value) == (
        f"logging.{package} needs the {package} package: pip install 'fedsim[{package}]'"
    )
    assert not config.run_dir.exists()


@pytest.mark.usefixtures("sink_env")
def test_the_cli_names_the_missing_extra_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    sets = [
        arg
        for override in _overrides(tmp_path, "logging.tensorboard=true")
        for arg in ("--set", override)
    ]

    assert main(["run", DEMO_CONFIG, *sets]) == EXIT_BAD_INPUT

    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "pip install 'fedsim[tensorboard]'" in line
    assert not (tmp_path / "run").exists()
