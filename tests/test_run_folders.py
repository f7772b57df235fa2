"""A run folder's results are never replaced by accident.

A new run refuses a folder that holds a run (exit 2, one line) unless given
--overwrite, and even then replaces it only once its first round has ended: a run
that fails to start leaves the old results as they were, byte for byte.
"""

from collections.abc import Sequence
from pathlib import Path

import pytest

from fedsim.app import config_from_run_config, overwrite_of
from fedsim.cli import main
from fedsim.clients import make_client_app
from fedsim.config import ConfigError, RunConfig, load_config, parse_config
from fedsim.engine import InlineGrid
from fedsim.experiment import build_task, run_on_grid
from fedsim.results import RUN_FILES, holds_run
from fedsim.runner import run_experiment
from tests.conftest import DEMO_CONFIG

SMALL = (
    "rounds=2",
    "data.num_clients=10",
    "strategy.clients_per_round=2",
    "client.local_epochs=1",
    "model.name=logreg",
    "progress=false",
)


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [f"output_dir={tmp_path}", "name=run", *SMALL, *extra]


def _cli(tmp_path: Path, *extra: str, flags: Sequence[str] = ()) -> int:
    sets = [arg for override in _overrides(tmp_path, *extra) for arg in ("--set", override)]
    return main(["run", DEMO_CONFIG, *sets, *flags])


def _config(tmp_path: Path, *extra: str) -> RunConfig:
    return load_config(DEMO_CONFIG, _overrides(tmp_path, *extra))


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _refusal(folder: Path) -> str:
    return (
        f"{folder}/ already holds a run; pass --resume to continue it or --overwrite to replace it"
    )


@pytest.fixture
def finished(tmp_path: Path) -> Path:
    """A finished run's folder, tmp_path/run, with a user's own file beside fedsim's."""
    assert _cli(tmp_path) == 0
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    return tmp_path / "run"


@pytest.mark.parametrize("name", RUN_FILES)
def test_any_of_fedsims_files_means_the_folder_holds_a_run(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    assert holds_run(tmp_path)


def test_a_missing_folder_or_one_of_a_users_files_holds_no_run(tmp_path: Path) -> None:
    assert not holds_run(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("mine")
    assert not holds_run(tmp_path)


def test_a_second_run_stops_before_any_work_naming_the_folder_and_the_choices(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _files(finished)
    capsys.readouterr()

    assert _cli(finished.parent, "rounds=5") == 2

    assert capsys.readouterr().err.strip() == f"fedsim: config error: {_refusal(finished)}"
    assert _files(finished) == before


def test_overwrite_replaces_fedsims_files_and_keeps_the_users(finished: Path) -> None:
    assert (finished / "metrics.png").exists()

    assert _cli(finished.parent, "rounds=1", "plot=false", flags=["--overwrite"]) == 0

    rounds = [line.split(",")[0] for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert rounds == ['{"round": 0', '{"round": 1']  # from round 0: the old checkpoint unused
    assert '"rounds": 1' in (finished / "summary.json").read_text()
    assert not (finished / "metrics.png").exists()  # the old run's plot went with it
    assert (finished / "notes.txt").read_text() == "keep me"


def test_resume_and_overwrite_together_are_one_line(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert _cli(finished.parent, "rounds=3", flags=["--resume", "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fedsim: config error: --resume and --overwrite exclude each other: "
        "continue a run or replace it"
    )


def test_the_python_entry_refuses_with_the_same_line_before_any_engine_starts(
    finished: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("Flower's simulation started")

    monkeypatch.setattr("flwr.simulation.run_simulation", started)
    config = _config(finished.parent, "engine.name=flower")
    with pytest.raises(ConfigError) as refused:
        run_experiment(config)
    assert str(refused.value) == _refusal(finished)


class _EngineThatCannotStart(InlineGrid):
    """Fails as the first round asks for its nodes (after round 0's evaluation)."""

    def __init__(self, config: RunConfig, error: BaseException) -> None:
        super().__init__(make_client_app(build_task(config)), num_nodes=config.data.num_clients)
        self.error = error

    def get_node_ids(self) -> list[int]:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [RuntimeError("the engine lost its workers"), KeyboardInterrupt()],
    ids=["engine-error", "interrupted"],
)
def test_a_run_that_fails_to_start_leaves_the_old_run_byte_for_byte(
    finished: Path, error: BaseException
) -> None:
    before = _files(finished)
    config = _config(finished.parent, "rounds=4")

    with pytest.raises(type(error)):
        run_on_grid(config, _EngineThatCannotStart(config, error), engine="inline", overwrite=True)

    assert _files(finished) == before


def test_a_bad_data_path_with_overwrite_leaves_the_old_run_and_says_nothing_of_it(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _files(finished)
    capsys.readouterr()
    bad_csv = ("devices.enabled=true", f"devices.csv={finished.parent / 'missing.csv'}")

    assert _cli(finished.parent, *bad_csv, flags=["--overwrite"]) == 1

    err = capsys.readouterr().err
    assert "missing.csv" in err and "results so far" not in err
    assert _files(finished) == before


def test_a_new_run_that_fails_to_start_creates_no_folder(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with pytest.raises(RuntimeError):
        run_on_grid(config, _EngineThatCannotStart(config, RuntimeError("no")), engine="inline")
    assert not config.run_dir.exists()


def test_flwr_run_takes_overwrite_from_its_run_config_apart_from_the_run() -> None:
    assert config_from_run_config({"rounds": 2, "overwrite": True}) == parse_config({"rounds": 2})
    assert overwrite_of({"overwrite": True}) and not overwrite_of({})
    with pytest.raises(ConfigError, match="overwrite = 'yes' has the wrong type"):
        overwrite_of({"overwrite": "yes"})
