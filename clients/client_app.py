"""The ``ClientApp`` of fedsim: one app answers every strategy's message types."""

from collections.abc import Callable, Sequence

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedsim.clients.gradient_client import GradientClient
from fedsim.clients.torch_client import TorchTask

ClientResolver = Callable[[Context], GradientClient]


def client_app(resolve: ClientResolver, mods: Sequence[Mod] = ()) -> ClientApp:
    """Return a ClientApp routing each message to the client ``resolve`` gives for its context.

    It answers ``train`` and ``evaluate`` (FedAvg and Flower's own strategies) and
    the named actions of :class:`GradientClient` (``train.anchor``, ...).
    """
    app = ClientApp(mods=list(mods))
    routes = {
        MessageType.TRAIN: "train",
        MessageType.EVALUATE: "evaluate",
        **GradientClient.ACTIONS,
    }
    for message_type, method in routes.items():
        category, _, action = message_type.partition(".")
        register = app.train if category == MessageType.TRAIN else app.evaluate
        register(action or "default")(_route(resolve, method))
    return app


def _route(resolve: ClientResolver, method: str) -> Callable[[Message, Context], Message]:
    def handle(message: Message, context: Context) -> Message:
        handler: Callable[[Message, Context], Message] = getattr(resolve(context), method)
        return handler(message, context)

    handle.__name__ = method
    return handle


def make_client_app(task: TorchTask, mods: Sequence[Mod] = ()) -> ClientApp:
    """Return a ClientApp for ``task`` whose one client serves every node of this process.

    ``mods`` are Flower client mods applied to every message (e.g.
    ``fedsim.clients.private_update.separated_privatization_mod``).
    """
    client = GradientClient(task)
    return client_app(lambda _context: client, mods)
