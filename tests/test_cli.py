"""The command line's own options: --version, --example and demo, --dry-run, --quiet, exit codes."""

import json
import tomllib
from pathlib import Path

import pytest

from fedsim.cli import EXIT_BAD_INPUT, EXIT_CODES, EXIT_FAILED, EXIT_INTERRUPTED, main
from fedsim.config import load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
# logreg on digits: 64 inputs x 10 classes + 10 biases = 650 floats, 2,600 bytes.
SMALL = ("rounds=1", "data.num_clients=10", "strategy.clients_per_round=2",
         "strategy.evaluate_clients=1", "client.local_epochs=1", "model.name=logreg",
         "plot=false")  # fmt: skip


def _sets(*settings: str) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def test_version_prints_the_projects_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out == f"fedsim {version}\n"


def test_help_ends_with_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert capsys.readouterr().out.endswith(EXIT_CODES)
    for code in (0, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED):
        assert f"\n  {code} " in EXIT_CODES


def test_example_demo_dry_run_prints_the_resolved_config_as_toml_and_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the demo's output_dir, runs/, is relative

    assert main(["run", "--example", "demo", "--dry-run"]) == 0

    printed = capsys.readouterr().out
    assert parse_config(tomllib.loads(printed)) == load_config(REPO / "fedsim/configs/demo.toml")
    assert "# cohort per round: 10 of 100 clients train, 0 evaluate" in printed
    assert list(tmp_path.iterdir()) == []


def test_demo_is_run_example_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--example", "demo", "--dry-run", *_sets("rounds=3")]) == 0
    by_run = capsys.readouterr().out
    assert main(["demo", "--dry-run", *_sets("rounds=3")]) == 0
    assert capsys.readouterr().out == by_run
    assert "\nrounds = 3\n" in by_run


def test_an_unknown_example_is_one_line_naming_the_examples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "--example", "nope"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines() == [
        "fedsim: config error: --example 'nope': no such example; the examples: demo"
    ]


def test_dry_run_plans_the_traffic_that_the_run_then_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = _sets(f"output_dir={tmp_path}", "name=small", *SMALL)

    assert main(["run", "--example", "demo", "--dry-run", *sets]) == 0

    plan = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# ")]
    assert plan[1:4] == [
        "# cohort per round: 2 of 10 clients train, 1 evaluate",
        "# model: 650 floats (2.6 kB)",
        # down: 3 clients x 650 floats; up: the 2 that train
        "# traffic per round: down 1,950 floats (7.8 kB), up 1,300 floats (5.2 kB)",
    ]
    assert not (tmp_path / "small").exists()
    # --quiet: nothing printed on success; the run counts what the plan said.
    assert main(["run", "--example", "demo", "--quiet", *sets]) == 0
    assert capsys.readouterr() == ("", "")
    last = json.loads((tmp_path / "small" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["downlink_floats"], last["uplink_floats"]) == (1950, 1300)


def test_run_without_a_config_or_an_example_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["run"])
    assert done.value.code == EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines()[-1] == (
        "fedsim run: error: one of the arguments config --example is required"
    )
