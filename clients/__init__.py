"""Client side: ClientApps around PyTorch models, and client mods."""

from fedsim.clients.torch_client import TorchClient, TorchTask, make_client_app, sgd

__all__ = ["TorchClient", "TorchTask", "make_client_app", "sgd"]
