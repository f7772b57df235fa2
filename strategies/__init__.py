"""Federated strategies: Flower ``Strategy`` subclasses, usable under any Flower runtime."""

from fedsim.strategies.bvr_l_sgd import BVRLSGD
from fedsim.strategies.central_dp import CentralDP
from fedsim.strategies.fedavg import FedAvg
from fedsim.strategies.gaussian_sum_release import GaussianSumRelease
from fedsim.strategies.local_sgd import LocalSGD
from fedsim.strategies.minibatch_sgd import MinibatchSGD
from fedsim.strategies.sarah import SARAH
from fedsim.strategies.scaffold import SCAFFOLD
from fedsim.strategies.secure_aggregation import SecureAggregation
from fedsim.strategies.secure_central_dp import SecureCentralDP

__all__ = [
    "BVRLSGD",
    "SARAH",
    "SCAFFOLD",
    "CentralDP",
    "FedAvg",
    "GaussianSumRelease",
    "LocalSGD",
    "MinibatchSGD",
    "SecureAggregation",
    "SecureCentralDP",
]
