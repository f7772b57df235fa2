"""fedsim is a Flower App: `flwr run` against a local simulation SuperLink runs it."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from fedsim.app import client_app, config_from_run_config, server_app
from fedsim.config import flatten, parse_config

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_components_are_the_apps_and_its_run_config_parses() -> None:
    import tomllib

    flwr_app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr_app["components"] == {
        "serverapp": "fedsim.app:server_app",
        "clientapp": "fedsim.app:client_app",
    }
    config = config_from_run_config(flwr_app["config"])
    assert config.data.num_clients == flwr_app["config"]["data.num_clients"]
    assert client_app is not None and server_app is not None


def test_run_config_round_trips_through_flowers_flat_form() -> None:
    config = parse_config({"rounds": 2, "client": {"lr": 0.01}})
    assert config_from_run_config(flatten(config)) == config


@pytest.mark.slow
def test_flwr_run_against_a_local_simulation_superlink(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr"),
        "NUM_SUPERNODES": "4",
        "FEDSIM_SUPERLINK_PORT": "39193",
    }
    overrides = f'rounds=2 strategy.clients_per_round=2 name="via-flwr" output_dir="{tmp_path}"'
    done = subprocess.run(
        [str(REPO / "experiments" / "flwr_run_local.sh"), overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary_path = tmp_path / "via-flwr" / "summary.json"
    assert summary_path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "completed" and summary["engine"] == "flwr-run"
    assert summary["rounds"] == 2 and summary["failures"] == 0
