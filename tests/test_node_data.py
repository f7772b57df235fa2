"""``data.load_partition``: each node's own data, from a hook that gets its node config.

A SuperNode names its data in ``--node-config``; fedsim's engines give each
simulated node ``partition-id`` and ``num-partitions``. Either way the hook gets
the whole node config, and what it returns is what the node trains on.
"""

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import UserConfig
from torch.utils.data import TensorDataset

from fedsim import keys
from fedsim.config import ConfigError, load_config
from fedsim.data.node_files import load_partition, write_partition_files
from fedsim.experiment import federated_data
from fedsim.runner import run_experiment
from tests.conftest import DEMO_CONFIG

TINY = [
    "rounds=2", "data.num_clients=4", "strategy.clients_per_round=4", "model.name=logreg",
    "client.local_epochs=1", "progress=false", "plot=false", "checkpoint_every=0",
]  # fmt: skip
SEEN: list[dict] = []
HOOKS = "tests.test_node_data"


def swapped_partitions(node_config: UserConfig) -> TensorDataset:
    """Node i trains on partition n-1-i of the config's split: data it would not get."""
    SEEN.append(dict(node_config))
    config = load_config(DEMO_CONFIG, TINY)
    n = int(node_config[keys.NUM_PARTITIONS])
    pid = int(node_config[keys.PARTITION_ID])
    return federated_data(config.data, config.seed).client_dataset(n - 1 - pid)


def not_a_dataset(_node_config: UserConfig) -> list[int]:
    return [1, 2, 3]


def test_each_node_trains_on_what_the_hook_returns_for_its_node_config(tmp_path: Path) -> None:
    # fedsim imports the hook by its path, a module apart from the one pytest collected.
    seen = importlib.import_module(HOOKS).SEEN
    seen.clear()
    hooked = load_config(
        DEMO_CONFIG,
        [*TINY, f"output_dir={tmp_path}", "name=hooked",
         f"data.load_partition={HOOKS}:swapped_partitions"],
    )  # fmt: skip
    plain = load_config(DEMO_CONFIG, [*TINY, f"output_dir={tmp_path}", "name=plain"])

    run_experiment(hooked)
    run_experiment(plain)

    assert {(s[keys.PARTITION_ID], s[keys.NUM_PARTITIONS]) for s in seen} == {
        (i, 4) for i in range(4)
    }
    hooked_model = torch.load(hooked.run_dir / "model.pt", weights_only=True)
    plain_model = torch.load(plain.run_dir / "model.pt", weights_only=True)
    # Same nodes, same seeds, other data: FedAvg weighs each node by its own count,
    # so the models differ; they would be equal if the hook's data went unused.
    assert not all(torch.equal(hooked_model[k], plain_model[k]) for k in plain_model)


def test_a_hook_that_is_not_an_import_path_or_returns_no_dataset_is_refused(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="data.load_partition = 'nodes' is not an import path"):
        load_config(DEMO_CONFIG, [*TINY, "data.load_partition=nodes"])
    config = load_config(
        DEMO_CONFIG,
        [*TINY, f"output_dir={tmp_path}", f"data.load_partition={HOOKS}:not_a_dataset"],
    )
    summary = run_experiment(config)
    assert summary["status"] == "completed" and summary["failures"] == 2 * 4


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_the_shipped_hook_reads_the_file_its_node_config_names(tmp_path: Path, suffix: str) -> None:
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    if suffix == ".pt":
        [path] = write_partition_files([TensorDataset(x, y)], tmp_path)
    else:
        path = tmp_path / "node.npz"
        np.savez(path, x=x.numpy(), y=y.numpy())

    dataset = load_partition({keys.PARTITION_ID: 0, keys.DATA_FILE: str(path)})

    assert torch.equal(dataset.tensors[0], x) and torch.equal(dataset.tensors[1], y)
    with pytest.raises(KeyError, match="start the SuperNode with --node-config"):
        load_partition({keys.PARTITION_ID: 0})
