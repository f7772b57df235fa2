"""Client side: ClientApps around PyTorch models, and client mods."""

from fedsim.clients.client_app import client_app, make_client_app
from fedsim.clients.torch_client import TorchClient, TorchTask, sgd

__all__ = ["TorchClient", "TorchTask", "client_app", "make_client_app", "sgd"]
