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
import torch

from fedsim.cli import EXIT_BAD_INPUT, main
from fedsim.config import load_config
from fedsim.data.node_files import load_partition
from fedsim.deploy.cli import deployed_run_config
from fedsim.deploy.localhost import app_config_keys
from fedsim.experiment import federated_data

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "configs" / "demo.toml"
# SCAFFOLD (the multi-exchange seam; one exchange a round): round 2 needs the control
# variate each worker left in its SuperNode's Context.state in round 1, which the
# SuperNode keeps for the run across the fresh ClientApp process of every message.
SMALL = ["rounds=2", "model.name=mlp", "strategy.clients_per_round=3", "strategy.name=scaffold",
         "strategy.local_steps=3", "client.batch_size=16"]  # fmt: skip


@pytest.mark.slow
def test_deploy_runs_scaffold_on_three_supernodes_reading_their_own_files(tmp_path: Path) -> None:
    # TLS and authentication are tests/test_deployment.py's; here the command's
    # --insecure path, which must warn, and --node-data, which fedsim split feeds:
    # each SuperNode reads its own file, none partitions the dataset (the server still
    # loads data.dataset, for its test split).
    sets = [arg for setting in SMALL for arg in ("--set", setting)]
    fedsim = [sys.executable, "-m", "fedsim.cli"]
    split = [
        *fedsim,
        "split",
        str(DEMO),
        "--out",
        "node-data",
        "--set",
        "data.num_clients=3",
        *sets,
    ]
    assert subprocess.run(split, cwd=tmp_path, capture_output=True, timeout=120).returncode == 0
    deploy = [*fedsim, "deploy", str(DEMO), "--nodes", "3", "--node-data", "node-data", *sets]

    done = subprocess.run(
        [*deploy, "--insecure"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )

    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "WARNING --insecure: no TLS and no SuperNode authentication" in done.stderr
    assert "federation up: an insecure SuperLink (no TLS)" in done.stdout
    assert ": finished:completed" in done.stdout
    run = tmp_path / "runs" / "demo"
    assert f"results in {run.resolve()}/" in done.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["engine"] == "flwr-run"
    assert summary["rounds"] == 2 and summary["failures"] == 0
    # The nodes' own files hold the partitions the inline engine computes itself.
    inline = ["run", str(DEMO), "--set", "data.num_clients=3", "--set", "engine.torch_threads=1"]
    inline += [*sets, "--set", 'name="inline"', "--set", f'output_dir="{tmp_path}"']
    assert main(inline) == 0
    deployed = torch.load(run / "model.pt", weights_only=True)
    expected = torch.load(tmp_path / "inline" / "model.pt", weights_only=True)
    assert deployed.keys() == expected.keys()
    assert all(torch.equal(deployed[name], expected[name]) for name in expected)


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


def test_a_default_the_app_declares_otherwise_is_sent() -> None:
    # The app's pyproject declares client.local_epochs = 5; a config asking for fedsim's
    # default, 1, must send it, or the deployed run would train 5 epochs.
    config = load_config(DEMO, ["client.local_epochs=1"])
    declared = app_config_keys(REPO)
    assert "client.local_epochs" in declared

    assert deployed_run_config(config, declared)["client.local_epochs"] == 1
    assert "client.local_epochs" not in deployed_run_config(config)  # what it did before


def test_node_data_missing_a_nodes_file_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "node-0.pt").write_bytes(b"")
    argv = ["deploy", str(DEMO), "--nodes", "2", "--node-data", str(tmp_path)]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("fedsim deploy: --node-data:") and err.count("\n") == 1


def test_split_writes_each_clients_partition_to_its_own_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = ["--set", "data.num_clients=3", "--set", "strategy.clients_per_round=3"]
    assert main(["split", str(DEMO), "--out", str(tmp_path), *sets]) == 0

    config = load_config(DEMO, ["data.num_clients=3", "strategy.clients_per_round=3"])
    data = federated_data(config.data, config.seed)
    for i in range(3):
        loaded = load_partition({"partition-id": i, "data-file": str(tmp_path / f"node-{i}.pt")})
        for mine, theirs in zip(loaded.tensors, data.client_dataset(i).tensors, strict=True):
            assert torch.equal(mine, theirs)
    assert "Wrote 3 files" in capsys.readouterr().out


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
