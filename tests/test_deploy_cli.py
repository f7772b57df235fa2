"""``fedsim deploy``: a config run on a real localhost federation, from the command line.

The command starts a TLS SuperLink and authenticated SuperNodes
(``fedsim.deploy.localhost.LocalFederation``), runs the config with ``flwr run``
and writes its results where ``fedsim run`` would: ``runs/<name>/`` under the
current folder.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.cli import EXIT_BAD_INPUT, deployed_run_config, main
from fedsim.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "configs" / "demo.toml"
SMALL = ["rounds=2", "model.name=mlp", "strategy.clients_per_round=3", "client.local_epochs=1"]


@pytest.mark.slow
def test_deploy_runs_the_demo_on_three_supernodes(tmp_path: Path) -> None:
    sets = [arg for setting in SMALL for arg in ("--set", setting)]
    command = [sys.executable, "-m", "fedsim.cli", "deploy", str(DEMO), "--nodes", "3", *sets]

    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)

    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "federation up" in done.stdout
    assert ": finished:completed" in done.stdout
    run = tmp_path / "runs" / "demo"
    assert f"results in {run.resolve()}/" in done.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["engine"] == "flwr-run"
    assert summary["rounds"] == 2 and summary["failures"] == 0


def test_run_config_holds_the_changed_keys_an_absolute_folder_and_one_client_per_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(DEMO, [*SMALL, "data.num_clients=3"])

    run_config = deployed_run_config(config)

    assert run_config["output_dir"] == str(tmp_path.resolve() / "runs")
    assert run_config["name"] == "demo" and run_config["rounds"] == 2
    assert run_config["data.num_clients"] == 3 and run_config["model.name"] == "mlp"
    assert "engine.name" not in run_config  # a default stays out


def test_insecure_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", str(DEMO), "--nodes", "3", "--insecure"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("fedsim deploy: --insecure: not supported yet") and err.count("\n") == 1


def test_a_run_folder_holding_a_run_is_refused_before_any_process_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "summary.json").write_text('{"status": "completed"}')
    (run / "metrics.jsonl").write_text("{}\n")

    assert main(["deploy", str(DEMO), "--nodes", "3"]) == EXIT_BAD_INPUT
    assert "config error" in capsys.readouterr().err
