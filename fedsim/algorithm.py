"""The algorithm seam: what a strategy class declares besides Flower's ``Strategy`` API.

An algorithm is a strategy class plus the client actions that answer its
message types. The class declares two things, so that fedsim can compose a
ClientApp for it and check a run's privacy options before any work:

``client_actions``
    A tuple of :class:`ClientAction`: for each message type the strategy sends
    besides Flower's plain ``train`` and ``evaluate`` (which every fedsim client
    answers), the handler that answers it, and optionally its cohort form (many
    messages at once, which the vmap engine batches). Missing means none.
``honours_privacy``
    The privacy options (:data:`PRIVACY_OPTIONS`) the algorithm gives in full,
    and ``privacy_refusals`` says why it refuses the others. Missing means it
    honours none: a privacy option a strategy cannot honour is refused before the
    run starts, never skipped silently.

A strategy whose global model is its own rather than the clients' (GS-WGAN's
generator, which never leaves the server) says so by being a
:class:`HoldsServerModel`: fedsim's runs then start from its arrays and evaluate
them its way.

Client mods (Flower's ``call_next`` middleware) that change what a client sends
come as :class:`ClientMod`, which names the message types the mod is written for;
a ClientApp whose algorithms send another type refuses to start.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from flwr.app import ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import Mod

if TYPE_CHECKING:
    from torch import Tensor

    from fedsim.clients.torch_client import TorchClient
    from fedsim.loop import EvaluateFn

#: The privacy options of a run config, and what each one promises.
PRIVACY_OPTIONS: Mapping[str, str] = {
    "client.dp_sgd": "record-level DP-SGD on every client, each node's ε reported",
    "privacy.local_dp": "every update privatized on the device (PrivUnit2 + ScalarDP)",
    "privacy.central_dp": "the aggregate released with Gaussian noise, ε accounted",
    "privacy.secure_aggregation": "the server sees only the cohort's masked sum, no update",
}

Handler = Callable[["TorchClient", Message, Context], Message]
#: Answers many messages of one type, one global model and config, at once (the vmap
#: engine); None for a message it leaves to the one-at-a-time handler.
CohortHandler = Callable[
    ["TorchClient", Sequence[Message], Sequence[Context]], Sequence[Message | None]
]


@dataclass(frozen=True)
class ClientAction:
    """A message type a strategy sends, and the client handler that answers it.

    ``message_type`` is Flower's ``"<category>.<action>"`` (``"train.scaffold"``);
    the handler gets the process's :class:`~fedsim.clients.TorchClient` (model,
    device, data), the message and the node's context, and returns the reply.
    ``cohort``, if given, answers a whole cohort's messages as one batched
    computation with the handler's results (see ``fedsim.clients.cohort``); the
    vmap engine uses it, every other engine the handler.
    """

    message_type: str
    handler: Handler
    cohort: CohortHandler | None = None


@dataclass(frozen=True)
class ClientMod:
    """A Flower mod and the message types it is written for.

    A mod that privatizes ``train`` replies would pass a ``train.scaffold`` reply
    through untouched: a ClientApp refuses to start with a mod that would see a
    message type outside ``handles``.
    """

    mod: Mod
    handles: frozenset[str]
    name: str


@runtime_checkable
class HoldsServerModel(Protocol):
    """A strategy whose global model is the server's own, not the model its clients train.

    GS-WGAN's clients train discriminators (the task's model) while the run's
    global arrays are the server's generator. ``fedsim run`` starts the loop
    from :meth:`initial_arrays` instead of the task model's and evaluates with
    :meth:`central_evaluator` instead of the task model's test accuracy.
    """

    def initial_arrays(self) -> ArrayRecord:
        """Return the global arrays before the first round."""

    def central_evaluator(self, test_x: "Tensor", test_y: "Tensor") -> "EvaluateFn | None":
        """Return the server-side evaluation of the global arrays on the test split, if any."""


#: The message types every fedsim ClientApp answers: Flower's plain ones.
STANDARD_MESSAGE_TYPES = frozenset({MessageType.TRAIN, MessageType.EVALUATE})


def client_actions(strategy_class: type) -> tuple[ClientAction, ...]:
    """Return the client actions ``strategy_class`` declares (none for Flower's own)."""
    return tuple(getattr(strategy_class, "client_actions", ()))


def message_types(strategy_classes: Iterable[type]) -> frozenset[str]:
    """Return every message type a ClientApp for these strategies answers."""
    declared = {a.message_type for cls in strategy_classes for a in client_actions(cls)}
    return STANDARD_MESSAGE_TYPES | declared


def privacy_refusal(strategy_class: type, option: str) -> str | None:
    """Return why ``strategy_class`` cannot honour ``option``, or ``None`` if it does."""
    if option not in PRIVACY_OPTIONS:
        raise ValueError(f"unknown privacy option {option!r}; one of {', '.join(PRIVACY_OPTIONS)}")
    if option in getattr(strategy_class, "honours_privacy", frozenset()):
        return None
    reasons: Mapping[str, str] = getattr(strategy_class, "privacy_refusals", {})
    return reasons.get(
        option,
        f"{strategy_class.__name__} does not declare that it honours {option} "
        "(honours_privacy on the strategy class)",
    )


def check_mods(mods: Iterable[ClientMod], sent: frozenset[str]) -> None:
    """Raise ``ValueError`` if a mod would see a message type it is not written for."""
    for client_mod in mods:
        unknown = sorted(sent - client_mod.handles)
        if unknown:
            raise ValueError(
                f"the {client_mod.name} mod handles {', '.join(sorted(client_mod.handles))} "
                f"messages, but the strategy also sends {', '.join(unknown)}: their replies "
                "would pass through it unchanged"
            )
