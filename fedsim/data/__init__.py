"""Datasets, partitioners and the federated view that clients and the server read."""

from fedsim.data.datasets import (
    CentralDataset,
    DatasetUnavailableError,
    load_digits,
    load_flwr_dataset,
    load_synthetic,
)
from fedsim.data.federated import FederatedData, build_federated_data
from fedsim.data.partition import label_skew, partition_indices

__all__ = [
    "CentralDataset",
    "DatasetUnavailableError",
    "FederatedData",
    "build_federated_data",
    "label_skew",
    "load_digits",
    "load_flwr_dataset",
    "load_synthetic",
    "partition_indices",
]
