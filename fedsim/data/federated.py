"""The federated view of a dataset: a central dataset plus a client partition.

:class:`FederatedData` is what clients and the server read from: a client asks
for its partition, the server for the shared test split. It holds indices, not
copies, so one object serves any number of simulated clients.
"""

from dataclasses import dataclass

import numpy as np
from torch.utils.data import TensorDataset

from fedsim.data.datasets import CentralDataset, load_digits, load_flwr_dataset, load_synthetic
from fedsim.data.least_squares import load_least_squares
from fedsim.data.partition import SCHEMES, partition_indices
from fedsim.data.text import load_pydocs
from fedsim.registry import DATASETS as SHIPPED_DATASETS
from fedsim.registry import NATURAL_SPLITS, ONLY_NATURAL

DATASETS = tuple(SHIPPED_DATASETS)  # named once, in fedsim.registry
PARTITIONERS = (*SCHEMES, "natural")


@dataclass(frozen=True)
class FederatedData:
    """A central dataset plus a partition of its train split over clients.

    Attributes
    ----------
    central : CentralDataset
        The train and test tensors.
    partitions : tuple[numpy.ndarray, ...]
        For each client (partition id ``0 .. num_partitions - 1``), its int64
        indices into ``central.train_x``. A partition may be empty (see
        :func:`~fedsim.data.partition.partition_indices`).
    """

    central: CentralDataset
    partitions: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        # A partition built for another dataset would otherwise fail (or, worse,
        # silently read the wrong samples) only when a client first trains.
        if not self.partitions:
            raise ValueError("partitions must hold at least one partition")
        n = len(self.central.train_y)
        for part in self.partitions:
            if part.size and (part.min() < 0 or part.max() >= n):
                raise ValueError(f"partitions must index into the {n} train samples")

    @property
    def num_partitions(self) -> int:
        """Number of clients the train split is partitioned over."""
        return len(self.partitions)

    def client_dataset(self, partition_id: int) -> TensorDataset:
        """Return the train samples of one client.

        Parameters
        ----------
        partition_id : int
            The client's partition, in ``[0, num_partitions)``; Flower's
            simulation runtime passes it as the ``partition-id`` node config.

        Returns
        -------
        TensorDataset
            ``(x, y)`` pairs of the partition (a copy, so clients cannot alter
            each other's data).
        """
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(
                f"partition_id must be in [0, {self.num_partitions}), got {partition_id}"
            )
        idx = self.partitions[partition_id]
        return TensorDataset(self.central.train_x[idx], self.central.train_y[idx])

    def test_dataset(self) -> TensorDataset:
        """Return the held-out test split, for centralized evaluation."""
        return TensorDataset(self.central.test_x, self.central.test_y)


def build_federated_data(
    *,
    dataset: str,
    partitioner: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    q: float = 0.0,
    test_fraction: float = 0.2,
    synthetic_alpha: float = 1.0,
    synthetic_beta: float = 1.0,
) -> FederatedData:
    """Load a dataset and partition its train split over ``num_clients`` clients.

    Nothing is cached here; callers that build the same data repeatedly cache it.

    Parameters
    ----------
    dataset : str
        ``"digits"``, ``"synthetic"``, ``"least-squares"`` (regression, see
        :func:`~fedsim.data.least_squares.load_least_squares`) and ``"pydocs"``
        (next character, see :mod:`fedsim.data.text`) work offline; ``"mnist"``, ``"emnist"``
        and ``"cifar10"`` download from the Hugging Face Hub.
    partitioner : str
        ``"iid"``, ``"dirichlet"``, ``"shards"`` or ``"qsplit"`` (see
        :func:`~fedsim.data.partition.partition_indices`), or ``"natural"``: the
        dataset's own clients (``NATURAL_SPLITS``: a Synthetic or least-squares
        client keeps the samples it generated, a pydocs client its topics).
        ``"synthetic"`` and ``"least-squares"`` take no other split, since their
        clients' differences are the point of the benchmark.
    num_clients : int
        Number of partitions.
    seed : int
        Seed of the train/test split, of Synthetic's generator and of the partitioner.
    alpha : float
        Dirichlet concentration for ``"dirichlet"``.
    shards_per_client : int
        Shards per client for ``"shards"``.
    q : float
        I.i.d. fraction of each client for ``"qsplit"``, in ``[0, 1]``: our
        reconstruction of Murata & Suzuki's heterogeneity parameter (see
        :func:`~fedsim.data.partition.qsplit_indices`).
    test_fraction : float
        Held-out fraction of the offline datasets; the Hub datasets
        keep their own test split.
    synthetic_alpha, synthetic_beta : float
        Synthetic(alpha, beta) heterogeneity of models and inputs.

    Returns
    -------
    FederatedData
        The dataset and its ``num_clients`` partitions.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    if partitioner not in PARTITIONERS:
        raise ValueError(f"partitioner must be one of {list(PARTITIONERS)}, got {partitioner!r}")
    if partitioner == "natural" and dataset not in NATURAL_SPLITS:
        raise ValueError(
            f'partitioner "natural" goes with {sorted(NATURAL_SPLITS)}, '
            f"got partitioner={partitioner!r} with dataset={dataset!r}"
        )
    if dataset in ONLY_NATURAL and partitioner != "natural":
        raise ValueError(
            f'dataset {dataset!r} goes with partitioner "natural", got partitioner={partitioner!r}'
        )
    if dataset == "synthetic":
        central, natural = load_synthetic(
            alpha=synthetic_alpha,
            beta=synthetic_beta,
            num_clients=num_clients,
            seed=seed,
            test_fraction=test_fraction,
        )
    elif dataset == "least-squares":
        central, natural = load_least_squares(
            num_clients=num_clients, seed=seed, test_fraction=test_fraction
        )
    elif dataset == "pydocs":
        central, natural = load_pydocs(num_clients=num_clients, test_fraction=test_fraction)
    else:
        central = load_central(dataset, seed=seed, test_fraction=test_fraction)
    if partitioner == "natural":
        return FederatedData(central=central, partitions=tuple(natural))
    return partitioned(  # pydocs pooled, or a dataset without clients of its own
        central,
        partitioner=partitioner,
        num_clients=num_clients,
        seed=seed,
        alpha=alpha,
        shards_per_client=shards_per_client,
        q=q,
    )


def load_central(dataset: str, *, seed: int, test_fraction: float = 0.2) -> CentralDataset:
    """Load a shipped dataset other than ``"synthetic"``, unpartitioned.

    ``seed`` and ``test_fraction`` split the digits (the Hub datasets keep their
    own test split); see :func:`build_federated_data`.
    """
    if dataset == "digits":
        return load_digits(test_fraction=test_fraction, seed=seed)
    return load_flwr_dataset(dataset, seed=seed)


def partitioned(
    central: CentralDataset,
    *,
    partitioner: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    q: float = 0.0,
) -> FederatedData:
    """Partition ``central``'s train split by label with one of ``SCHEMES``.

    The parameters are :func:`build_federated_data`'s; a dataset plug-in's
    ``CentralDataset`` goes through here too. A regression dataset has no labels
    to split by: only ``"iid"`` applies to it.
    """
    if central.task == "regression" and partitioner != "iid":
        raise ValueError(
            f"data.partitioner = {partitioner!r} splits by class label, and a regression "
            "dataset has none; use 'iid' (or a loader that returns its own clients)"
        )
    labels = central.train_y.numpy()
    partitions = partition_indices(
        labels if central.task != "regression" else np.zeros(len(labels), dtype=np.int64),
        scheme=partitioner,
        num_partitions=num_clients,
        seed=seed,
        alpha=alpha,
        shards_per_partition=shards_per_client,
        q=q,
    )
    return FederatedData(central=central, partitions=tuple(partitions))
