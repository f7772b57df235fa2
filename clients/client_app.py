"""The ``ClientApp`` of fedsim, composed from the client actions of the algorithms in use.

Every app answers Flower's plain ``train`` and ``evaluate`` (FedAvg and Flower's
own strategies) with :class:`TorchClient`; each algorithm adds the actions its
strategy class declares (``client_actions``, see :mod:`fedsim.algorithm`), so no
client class knows every algorithm and a plug-in brings its own.
"""

from collections.abc import Callable, Iterable, Sequence, Sized
from typing import cast

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedsim.algorithm import (
    ClientMod,
    CohortHandler,
    Handler,
    check_mods,
    client_actions,
    message_types,
)
from fedsim.clients.cohort import client_tensors, per_client_bytes
from fedsim.clients.torch_client import TorchClient, TorchTask

ClientResolver = Callable[[Context], TorchClient]


def client_app(
    resolve: ClientResolver,
    mods: Sequence[Mod | ClientMod] = (),
    *,
    algorithms: Iterable[type] = (),
) -> ClientApp:
    """Return a ClientApp routing each message to the client ``resolve`` gives for its context.

    ``algorithms`` are strategy classes whose ``client_actions`` the app answers
    besides ``train`` and ``evaluate``. ``mods`` are Flower mods applied to every
    message; a :class:`~fedsim.algorithm.ClientMod` that would see a message type
    it is not written for makes this raise ``ValueError`` (see ``check_mods``).
    """
    algorithms = tuple(algorithms)
    check_mods((m for m in mods if isinstance(m, ClientMod)), message_types(algorithms))
    app = ClientApp(mods=[m.mod if isinstance(m, ClientMod) else m for m in mods])
    handlers: dict[str, Handler] = {
        MessageType.TRAIN: TorchClient.train,
        MessageType.EVALUATE: TorchClient.evaluate,
    }
    for algorithm in algorithms:
        for action in client_actions(algorithm):
            if handlers.get(action.message_type, action.handler) is not action.handler:
                raise ValueError(
                    f"{algorithm.__name__}'s action for {action.message_type} clashes with "
                    "another algorithm's"
                )
            handlers[action.message_type] = action.handler
    for message_type, handler in handlers.items():
        category, _, action_name = message_type.partition(".")
        register = app.train if category == MessageType.TRAIN else app.evaluate
        register(action_name or "default")(_route(resolve, handler))
    return app


def _route(resolve: ClientResolver, handler: Handler) -> Callable[[Message, Context], Message]:
    def handle(message: Message, context: Context) -> Message:
        return handler(resolve(context), message, context)

    handle.__name__ = getattr(handler, "__name__", "handle")
    return handle


def make_client_app(
    task: TorchTask, mods: Sequence[Mod | ClientMod] = (), *, algorithms: Iterable[type] = ()
) -> ClientApp:
    """Return a ClientApp for ``task`` whose one client serves every node of its process.

    ``algorithms`` are the strategy classes whose client actions it answers
    (``[fedsim.strategies.SCAFFOLD]``); ``mods`` are Flower client mods applied
    to every message (e.g. ``fedsim.experiment.client_mods(config)``). The app
    pickles with the task (its data included) and builds its client where it
    first runs, so a Ray actor resolves ``device="auto"`` for itself.
    """
    return client_app(ProcessClient(task), mods, algorithms=algorithms)


class ProcessClient:
    """The one :class:`TorchClient` of ``task`` in this process, built on first use."""

    def __init__(self, task: TorchTask) -> None:
        self.task = task
        self._client: TorchClient | None = None

    def __call__(self, _context: Context) -> TorchClient:
        """Return the client, building it the first time."""
        if self._client is None:
            self._client = TorchClient(self.task)
        return self._client

    def __getstate__(self) -> dict[str, object]:
        return {"task": self.task, "_client": None}  # a copy builds its own client


class CohortApp:
    """The cohort forms of a ClientApp's actions: what the vmap engine trains batched.

    Plain ``train`` has one (:meth:`TorchClient.train_cohort`); an algorithm's
    action has one where its :class:`~fedsim.algorithm.ClientAction` gives
    ``cohort``. ``resolve`` is the ClientApp's own, so both share one model.
    """

    def __init__(self, resolve: ClientResolver, algorithms: Iterable[type] = ()) -> None:
        self.resolve = resolve
        self.handlers: dict[str, CohortHandler] = {MessageType.TRAIN: TorchClient.train_cohort}
        actions = [action for algorithm in algorithms for action in client_actions(algorithm)]
        for action in actions:  # a type one algorithm answers without a cohort form has none
            if action.cohort is not None:
                self.handlers[action.message_type] = action.cohort
        for action in actions:
            if action.cohort is None:
                self.handlers.pop(action.message_type, None)

    def __call__(
        self, messages: Sequence[Message], contexts: Sequence[Context]
    ) -> Sequence[Message | None]:
        """Answer messages of one type (one model, one config); None: run it one at a time."""
        client = self.resolve(contexts[0])
        return self.handlers[messages[0].metadata.message_type](client, messages, contexts)

    def refusal(self, context: Context) -> str | None:
        """Say in one line why the task cannot train batched (probed on ``context``), or None."""
        return self.resolve(context).cohort_refusal(context)

    def num_samples(self, context: Context) -> int:
        """Return how many samples the node of ``context`` holds."""
        return len(cast(Sized, self.resolve(context).partition(context)))

    def client_bytes(self, context: Context) -> int:
        """Estimate the memory one client of a cohort takes (probed on ``context``'s data)."""
        client = self.resolve(context)
        inputs, _ = client_tensors(client.partition(context), client.device)
        return per_client_bytes(
            client.process_model(), inputs[: client.task.batch_size], len(inputs)
        )

    def unbatched(self, sent: Iterable[str]) -> list[str]:
        """Return the training message types among ``sent`` that have no cohort form."""
        return sorted(
            t for t in sent if t not in self.handlers and not t.startswith(MessageType.EVALUATE)
        )


def make_apps(
    task: TorchTask, mods: Sequence[Mod | ClientMod] = (), *, algorithms: Iterable[type] = ()
) -> tuple[ClientApp, CohortApp]:
    """Return :func:`make_client_app`'s ClientApp and its :class:`CohortApp`, sharing one client."""
    algorithms = tuple(algorithms)
    resolve = ProcessClient(task)
    return client_app(resolve, mods, algorithms=algorithms), CohortApp(resolve, algorithms)
