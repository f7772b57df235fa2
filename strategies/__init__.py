"""Federated strategies: Flower ``Strategy`` subclasses, usable under any Flower runtime."""

from fedsim.strategies.fedavg import FedAvg

__all__ = ["FedAvg"]
