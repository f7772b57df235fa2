"""Each node's own data from a file on its machine: a ready ``data.load_partition`` hook.

On a real federation every SuperNode trains on data that lives on its own
machine. The run config names a hook, ``data.load_partition =
"fedsim.data.node_files:load_partition"``, and each SuperNode names its file in
its node config::

    flower-supernode ... --node-config "partition-id=0 num-partitions=3 data-file='/srv/site-a.pt'"

The file holds a node's inputs and integer labels: a ``torch.save``-d dict
``{"x": tensor, "y": tensor}`` (``.pt``), or NumPy arrays ``x`` and ``y`` in an
``.npz``. :func:`write_partition_files` writes such files from a config's own
partitions, to rehearse a deployment with data that fedsim ships. A format of
your own is a hook of your own: any ``module:function`` taking the node config.
"""

from pathlib import Path

import numpy as np
import torch
from flwr.app import UserConfig
from torch.utils.data import TensorDataset

from fedsim.keys import DATA_FILE


def load_partition(node_config: UserConfig) -> TensorDataset:
    """Return the ``(x, y)`` pairs of the file ``node_config["data-file"]`` names."""
    try:
        path = Path(str(node_config[DATA_FILE]))
    except KeyError:
        raise KeyError(
            f"node_config has no {DATA_FILE!r}; start the SuperNode with --node-config "
            f"\"... {DATA_FILE}='/path/to/its-data.pt'\""
        ) from None
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    else:
        tensors = torch.load(path, weights_only=True)
        x, y = tensors["x"], tensors["y"]
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} inputs but {len(y)} labels")
    return TensorDataset(x, y.long())


def write_partition_files(
    partitions: list[TensorDataset], out: Path, *, stem: str = "node"
) -> list[Path]:
    """Write each partition's tensors to ``out/<stem>-<i>.pt``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, partition in enumerate(partitions):
        x, y = partition.tensors
        path = out / f"{stem}-{i}.pt"
        torch.save({"x": x, "y": y}, path)
        paths.append(path)
    return paths
