"""Federated strategies: Flower ``Strategy`` subclasses, usable under any Flower runtime.

The privacy wrappers load Opacus, SciPy and ``cryptography``; they are imported
on first use (PEP 562), so a run without privacy does not pay for them.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from fedsim.strategies.bvr_l_sgd import BVRLSGD
from fedsim.strategies.fedavg import FedAvg
from fedsim.strategies.local_sgd import LocalSGD
from fedsim.strategies.minibatch_sgd import MinibatchSGD
from fedsim.strategies.sarah import SARAH
from fedsim.strategies.scaffold import SCAFFOLD

if TYPE_CHECKING:
    from fedsim.strategies.central_dp import CentralDP
    from fedsim.strategies.gaussian_sum_release import GaussianSumRelease
    from fedsim.strategies.secure_aggregation import SecureAggregation
    from fedsim.strategies.secure_central_dp import SecureCentralDP

_PRIVATE = {
    "CentralDP": "central_dp",
    "GaussianSumRelease": "gaussian_sum_release",
    "SecureAggregation": "secure_aggregation",
    "SecureCentralDP": "secure_central_dp",
}

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


def __getattr__(name: str) -> Any:
    if name in _PRIVATE:
        return getattr(import_module(f"fedsim.strategies.{_PRIVATE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
