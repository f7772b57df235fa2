"""What every fedsim engine shares: a run, a lazy population, Flower's bookkeeping."""

from abc import abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Self

from flwr.app import Message, RecordDict, UserConfig
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedsim.engine.execute import assign_message_id
from fedsim.engine.identity import claim_server_identity
from fedsim.engine.nodes import NodeRegistry
from fedsim.engine.replies import in_node_order


class SimulatedGrid(Grid):
    """Base of fedsim's engines: subclasses only decide how messages execute.

    It owns the run, the :class:`NodeRegistry` (ids and lazy per-node contexts)
    and ``compute_seconds``: the seconds each client spent on a message of the
    latest exchange, by instruction id, which device-heterogeneity models scale
    into simulated time. Engines sharing this base number nodes alike, which is
    what lets the same seed give the same model on every engine. Pushed messages
    wait here until their replies are pulled, when an engine runs them.

    An engine implements :meth:`stream_replies` (replies as they arrive); the
    Flower-standard :meth:`send_and_receive` is that stream as a list in node order
    (see :mod:`fedsim.engine.replies`). Every engine is a context manager whose
    exit calls :meth:`shutdown`.

    ``check_finite_arrays`` turns a reply whose arrays hold a NaN or an Inf into an
    error reply (see :func:`fedsim.engine.execute.run_client_app`).
    """

    def __init__(
        self,
        *,
        num_nodes: int,
        run_config: UserConfig | None,
        run_id: int,
        check_finite_arrays: bool = True,
    ) -> None:
        self._run = Run.create_empty(run_id)
        self.nodes = NodeRegistry(num_nodes, run_id=run_id, run_config=run_config or {})
        self.compute_seconds: dict[str, float] = {}
        self.check_finite_arrays = check_finite_arrays
        self._pushed: dict[str, Message] = {}
        claim_server_identity(run_id)

    @abstractmethod
    def stream_replies(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Run the messages; yield one reply per message as it is ready.

        ``timeout`` bounds the whole exchange: messages that have not started when
        it expires get a ``NODE_UNAVAILABLE`` error reply instead of running.
        """

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Run the messages; return every reply, as a list in node order (Flower's contract)."""
        sent = list(messages)
        return in_node_order(sent, self.stream_replies(sent, timeout=timeout))

    def shutdown(self) -> None:
        """Release what the engine holds (workers, actors); a no-op where it holds nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def set_run(self, run: Run) -> None:
        """Adopt the run this grid serves."""
        self._run = run
        claim_server_identity(run.run_id)

    @property
    def run(self) -> Run:
        """Run information."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a message (deprecated in Flower; kept for older strategies)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages; they run when their replies are pulled."""
        ids = []
        for message in messages:
            assign_message_id(message)
            self._pushed[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def _take_pushed(self, message_ids: Iterable[str]) -> list[Message]:
        """Remove and return the pushed messages with these ids (unknown ids are skipped)."""
        return [self._pushed.pop(i) for i in message_ids if i in self._pushed]

    def state_dict(self) -> dict[str, Any]:
        """Return the nodes' state, for run checkpoints."""
        return self.nodes.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the nodes' state from :meth:`state_dict`."""
        self.nodes.load_state_dict(state)

    def get_node_ids(self) -> Sequence[int]:
        """Return all node ids as a lazy ``range``."""
        return self.nodes.node_ids


def threads_for(num_cpus: float) -> int:
    """Return torch intra-op threads for a worker (actor or thread) holding ``num_cpus`` CPUs.

    Torch's default (one thread per core) in every worker oversubscribes the
    machine: on 2 cores, threads spinning in OpenMP barriers stalled rounds for
    15-20 s. Each worker gets threads for its own share only.
    """
    return max(1, int(num_cpus))
