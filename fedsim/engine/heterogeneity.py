"""Device heterogeneity: slow, flaky and thinly connected clients, and a round deadline.

Real federations are not a rack of identical machines. Phones differ tenfold in
compute, come and go, and sit behind links of a few megabits; a production server
therefore gives each round a reporting deadline and drops the stragglers
(Bonawitz et al., "Towards Federated Learning at Scale: System Design", MLSys 2019).
FedScale (Lai et al., "FedScale: Benchmarking Model and System Performance of
Federated Learning at Scale", ICML 2022) showed that such system heterogeneity
changes which algorithm wins, so a simulator that ignores it flatters them all.

This module adds it to any engine by *wrapping* the engine's ``Grid``:
:class:`HeterogeneousGrid` keeps a device offline with its profile's probability,
scales the compute time the inner engine measured by the device's speed, adds the
transfer time of the arrays over its link, and turns replies that would arrive after
the deadline into error replies, which Flower's strategies count and skip. Every
draw comes from ``fedsim.seeding``, so a round replays in isolation.
"""

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedsim import keys
from fedsim.checkpoint import Stateful
from fedsim.engine.devices import DeviceProfile, ProfileSource, array_bytes, simulated_seconds
from fedsim.engine.execute import assign_message_id, error_reply
from fedsim.engine.replies import StreamingGrid, in_node_order
from fedsim.records import records_of
from fedsim.seeding import numpy_rng


@dataclass(frozen=True)
class RoundTiming:
    """How one exchange went, in real and in simulated time.

    ``sent - unavailable - late - completed`` replies were errors from the inner
    engine (a client that raised, a timeout); they have no simulated time.

    Attributes
    ----------
    real_s
        Wall time from the first reply asked for to the last one handed over.
    simulated_s
        When the round would have ended on the devices: the slowest completed
        client, or the deadline if any client missed it; 0 if no client ran.
    sent, unavailable, late, completed
        Messages sent; devices offline (never ran); clients that ran but missed
        the deadline (dropped); clients whose replies were handed over.
    """

    real_s: float
    simulated_s: float
    sent: int
    unavailable: int
    late: int
    completed: int


@dataclass
class _Tally:
    sent: int = 0
    unavailable: int = 0
    late: int = 0
    completed: int = 0
    slowest_s: float = 0.0


@dataclass(frozen=True)
class _Sent:
    message: Message
    profile: DeviceProfile
    bytes_down: int


class HeterogeneousGrid(Grid):
    """Wrap another engine's ``Grid``: devices go offline, run slower or faster, miss the deadline.

    Heterogeneity applies to ``send_and_receive`` and ``stream_replies`` (a list
    in node order, or a stream, as on fedsim's engines); ``push_messages`` /
    ``pull_messages`` go straight to the inner grid.

    Parameters
    ----------
    inner
        The engine that runs the clients. If it has ``compute_seconds`` (seconds
        per client by instruction id, as ``InlineGrid`` keeps), those are scaled by
        each device's speed; otherwise compute counts as 0 and only transfers take time.
    profiles
        Where each node's ``DeviceProfile`` comes from.
    seed
        Root seed of the availability draws: device ``n`` is reachable in round
        ``r`` iff ``numpy_rng(seed, r, n, "availability").random() < availability``.
        The round is the message's ``"server-round"`` config entry, so training and
        evaluation of one round see the same devices; without it, the exchange count.
    deadline_s
        Simulated seconds a client may take; later replies become
        ``REPLY_MESSAGE_UNAVAILABLE`` error replies. ``None``: no deadline.
    """

    def __init__(
        self,
        inner: Grid,
        profiles: ProfileSource,
        *,
        seed: int,
        deadline_s: float | None = None,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0 or None, got {deadline_s}")
        self.inner = inner
        self.profiles = profiles
        self._seed = seed
        self.deadline_s = deadline_s
        self._exchanges = 0
        self.last_timing: RoundTiming | None = None
        self.timings: list[RoundTiming] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Return :meth:`stream_replies` as a list in node order (Flower's contract)."""
        sent = list(messages)
        return in_node_order(sent, self.stream_replies(sent, timeout=timeout))

    def stream_replies(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Send ``messages`` to the reachable devices and stream the replies.

        Offline devices get their error replies first, without running; the others
        run on the inner grid, and each reply is timed as it arrives. ``last_timing``
        is set once the returned iterator is exhausted.
        """
        self._exchanges += 1
        start = time.perf_counter()
        tally = _Tally()
        waiting: dict[int, list[_Sent]] = {}  # by node: replies carry src, not our object
        for message in messages:
            tally.sent += 1
            node = message.metadata.dst_node_id
            profile = self.profiles.profile(node)
            if self._reachable(message, profile):
                sent = _Sent(message, profile, array_bytes(message.content))
                waiting.setdefault(node, []).append(sent)
            else:
                tally.unavailable += 1
                assign_message_id(message)  # a reply must point at an id
                yield error_reply(message, ErrorCode.NODE_UNAVAILABLE, "device offline this round")
        if waiting:
            reachable = [sent.message for queue in waiting.values() for sent in queue]
            inner = self.inner
            replies = (
                inner.stream_replies(reachable, timeout=timeout)
                if isinstance(inner, StreamingGrid)
                else inner.send_and_receive(reachable, timeout=timeout)
            )
            for reply in replies:
                yield self._judge(reply, waiting, tally)
        simulated_s = self._round_end(tally)
        self.last_timing = RoundTiming(
            real_s=time.perf_counter() - start,
            simulated_s=simulated_s,
            sent=tally.sent,
            unavailable=tally.unavailable,
            late=tally.late,
            completed=tally.completed,
        )
        self.timings.append(self.last_timing)

    def _reachable(self, message: Message, profile: DeviceProfile) -> bool:
        round_ = _server_round(message.content)
        round_ = self._exchanges if round_ is None else round_
        node = message.metadata.dst_node_id
        return bool(
            numpy_rng(self._seed, round_, node, "availability").random() < profile.availability
        )

    def _judge(self, reply: Message, waiting: dict[int, list[_Sent]], tally: _Tally) -> Message:
        """Time one reply from the inner grid; hand it over, or drop it as late."""
        if reply.has_error():
            return reply  # the inner engine's verdict stands; it has no simulated time
        # Ids are read now, after the inner grid assigned them on sending.
        instruction_id = reply.metadata.reply_to_message_id
        sent = _pop_match(waiting, reply.metadata.src_node_id, instruction_id)
        compute = getattr(self.inner, "compute_seconds", {}).get(instruction_id, 0.0)
        seconds = simulated_seconds(
            sent.profile,
            compute_s=compute,
            bytes_down=sent.bytes_down,
            bytes_up=array_bytes(reply.content),
        )
        if self.deadline_s is not None and seconds > self.deadline_s:
            tally.late += 1
            reason = f"missed the {self.deadline_s:.3g} s deadline (simulated {seconds:.3g} s)"
            late = error_reply(sent.message, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason)
            # Point where the inner grid's reply pointed, even if it sent a copy.
            late.metadata.__dict__["_reply_to_message_id"] = instruction_id
            return late
        tally.completed += 1
        tally.slowest_s = max(tally.slowest_s, seconds)
        return reply

    def _round_end(self, tally: _Tally) -> float:
        if tally.late and self.deadline_s is not None:
            return self.deadline_s  # the server waited until the deadline, then moved on
        return tally.slowest_s

    def state_dict(self) -> dict[str, Any]:
        """Return what a resumed run needs.

        That is the exchange count, the timings so far and the inner grid's state
        (when it has one).
        """
        inner = self.inner.state_dict() if isinstance(self.inner, Stateful) else None
        return {
            "exchanges": self._exchanges,
            "timings": [asdict(t) for t in self.timings],
            "inner": inner,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self._exchanges = int(state["exchanges"])
        self.timings = [RoundTiming(**t) for t in state["timings"]]
        self.last_timing = self.timings[-1] if self.timings else None
        if state.get("inner") is not None and isinstance(self.inner, Stateful):
            self.inner.load_state_dict(state["inner"])

    # Everything else is the inner grid's business.
    def set_run(self, run: Run) -> None:
        """Set the run on the inner grid."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """Run information of the inner grid."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a message on the inner grid."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Return the inner grid's node ids: offline devices are still enrolled."""
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Return the inner grid's nodes."""
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push to the inner grid, with no heterogeneity."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull from the inner grid, with no heterogeneity."""
        return self.inner.pull_messages(message_ids)


def _server_round(content: RecordDict) -> int | None:
    """Return the ``"server-round"`` entry of any config record in ``content``."""
    for record in records_of(content, ConfigRecord).values():
        value = record.get(keys.SERVER_ROUND)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _pop_match(waiting: dict[int, list[_Sent]], node: int, instruction_id: str) -> _Sent:
    """Take the message ``node`` answered: the one with the id, else its oldest one."""
    queue = waiting.get(node)
    if not queue:
        raise RuntimeError(f"inner grid sent a reply from node {node}, which had no message")
    ids = [sent.message.metadata.message_id for sent in queue]
    return queue.pop(ids.index(instruction_id) if instruction_id in ids else 0)
