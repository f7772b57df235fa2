"""The round loop: the one place where a federation advances, whatever the engine.

It drives any ``flwr.serverapp.strategy.Strategy`` exactly as Flower's
``Strategy.start`` does (configure -> ``grid.send_and_receive`` -> aggregate, for
training then evaluation, then centralized evaluation), and adds what a
simulation user needs around each round: replies in node order for Flower's
strategies and as a stream for fedsim's (:mod:`fedsim.engine.replies`), timing,
reply and failure counts, communication volume, and a :class:`RoundReport`
handed to observers (progress bar, metrics files).

Training may take several exchanges per round (BVR-L-SGD asks every worker for a
gradient estimate, then one worker for its local model). Such a strategy has a
``train_round`` generator (:class:`MultiExchangeStrategy`) that yields each
exchange's messages and receives its replies; a plain Flower strategy's
configure/aggregate pair is the one-exchange case. Both go through the same
code below, so counting, timing and seeding never depend on the strategy.
"""

import math
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.checkpoint import RunCheckpoint
from fedsim.engine.execute import failure_kind
from fedsim.engine.replies import StreamingGrid, in_node_order, streams_replies
from fedsim.records import records_of

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
TrainResult = tuple[ArrayRecord | None, MetricRecord | None]
# Yields each exchange's messages, receives that exchange's replies, returns what
# ``Strategy.aggregate_train`` returns.
TrainRound = Generator[Iterable[Message], Iterable[Message], TrainResult]


@runtime_checkable
class ReportsPrivacy(Protocol):
    """A strategy with a privacy accountant (``fedsim.strategies.CentralDP``)."""

    def privacy(self) -> Mapping[str, float]:
        """Return the privacy spent so far, e.g. ``{"epsilon": 1.2, "delta": 1e-5}``."""


@runtime_checkable
class MultiExchangeStrategy(Protocol):
    """A strategy whose training round is a sequence of exchanges.

    ``train_round`` must consume an exchange's replies before it yields the
    next exchange (or returns): the loop then knows the exchange is over.
    """

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Run one round's exchanges; return the new global arrays and metrics."""


@dataclass(frozen=True)
class RoundReport:
    """What happened in one round; round 0 reports the initial model."""

    round: int
    num_rounds: int
    train: Mapping[str, float] = field(default_factory=dict)
    evaluate: Mapping[str, float] = field(default_factory=dict)
    central: Mapping[str, float] = field(default_factory=dict)
    replies: int = 0
    failures: int = 0
    round_s: float = 0.0
    elapsed_s: float = 0.0
    simulated_s: float | None = None
    unavailable: int = 0
    late: int = 0
    exchanges: int = 0
    downlink_floats: int = 0
    uplink_floats: int = 0
    privacy: Mapping[str, float] = field(default_factory=dict)
    # Error replies by kind (fedsim.engine.execute.failure_kind); they sum to ``failures``.
    failure_kinds: Mapping[str, int] = field(default_factory=dict)

    def as_row(self) -> dict[str, object]:
        """Return a flat JSON-ready row: ``train_*``, ``evaluate_*``, ``central_*``, ``failures_*``.

        ``failures_<kind>`` counts the round's error replies of each kind.
        """
        groups = {"train": "train", "evaluate": "evaluate", "central": "central",
                  "privacy": "privacy", "failure_kinds": "failures"}  # fmt: skip
        row = {k: v for k, v in asdict(self).items() if k not in groups}
        for group, prefix in groups.items():
            row.update({f"{prefix}_{k}": v for k, v in getattr(self, group).items()})
        return row


class RoundObserver(Protocol):
    """Something that follows a run round by round (progress bar, metrics file)."""

    def on_round(self, report: RoundReport) -> None:
        """Receive the report of a finished round."""


class _DeviceTimes:
    """Sum the simulated time of a round's exchanges, on grids that simulate devices.

    Such grids (``HeterogeneousGrid``) expose ``last_timing`` after each exchange;
    on any other grid this records nothing.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.simulated_s: float | None = None
        self.unavailable = self.late = 0

    def add_last_exchange(self) -> None:
        timing = getattr(self._grid, "last_timing", None)
        if timing is None:
            return
        self.simulated_s = (self.simulated_s or 0.0) + timing.simulated_s
        self.unavailable += timing.unavailable
        self.late += timing.late


class _Traffic:
    """Count a round's exchanges, replies, failures and floats sent each way.

    Floats are the elements of every ``ArrayRecord`` in a message's content,
    counted per message: a model sent to ten clients is ten models of downlink,
    as it would be on a network, even though the simulation shares one copy.
    """

    def __init__(self) -> None:
        self.exchanges = self.replies = self.failures = 0
        self.failure_kinds: Counter[str] = Counter()
        self.downlink_floats = self.uplink_floats = 0
        self.last_exchange_size = 0

    def sent(self, messages: Iterable[Message]) -> Iterator[Message]:
        """Pass an exchange's messages through, counting them; sets ``last_exchange_size``."""
        self.last_exchange_size = 0
        last_content, last_floats = None, 0
        for message in messages:
            if message.content is not last_content:  # a cohort usually shares one RecordDict
                last_content, last_floats = message.content, _floats_in(message.content)
            self.downlink_floats += last_floats
            self.last_exchange_size += 1
            yield message
        self.exchanges += self.last_exchange_size > 0

    def received(self, replies: Iterable[Message]) -> Iterator[Message]:
        """Pass replies through, counting them, their failures and their floats."""
        for reply in replies:
            self.replies += 1
            if reply.has_error():
                self.failures += 1
                self.failure_kinds[failure_kind(reply.error)] += 1
            else:
                self.uplink_floats += _floats_in(reply.content)
            yield reply


def _floats_in(content: RecordDict) -> int:
    return sum(
        math.prod(array.shape)
        for record in records_of(content, ArrayRecord).values()
        for array in record.values()
    )


def train_exchanges(
    strategy: Strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
) -> TrainRound:
    """Return a round's training as exchanges, for any strategy."""
    if isinstance(strategy, MultiExchangeStrategy):
        return strategy.train_round(server_round, arrays, config, grid)
    return _one_exchange(strategy, server_round, arrays, config, grid)


def _one_exchange(
    strategy: Strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
) -> TrainRound:
    replies = yield strategy.configure_train(server_round, arrays, config, grid)
    return strategy.aggregate_train(server_round, replies)


def _exchange(
    grid: Grid,
    messages: Iterable[Message],
    traffic: _Traffic,
    devices: _DeviceTimes,
    timeout: float | None,
    *,
    stream: bool,
) -> Iterable[Message]:
    """Send one exchange's messages and hand over its replies, counting both.

    With ``stream`` (a :class:`~fedsim.engine.replies.StreamingStrategy`) on a grid
    that streams, replies arrive one at a time as clients finish; otherwise they
    come as Flower's strategies expect them, a list in node order, which makes
    order-sensitive aggregations give the same model on every grid.
    """
    if stream and isinstance(grid, StreamingGrid):
        return _streamed(grid, messages, traffic, devices, timeout)
    sent = list(traffic.sent(messages))
    replies = in_node_order(sent, grid.send_and_receive(sent, timeout=timeout))
    counted = list(traffic.received(replies))
    _exchange_done(traffic, devices)
    return counted


def _streamed(
    grid: StreamingGrid,
    messages: Iterable[Message],
    traffic: _Traffic,
    devices: _DeviceTimes,
    timeout: float | None,
) -> Iterator[Message]:
    yield from traffic.received(grid.stream_replies(traffic.sent(messages), timeout=timeout))
    _exchange_done(traffic, devices)


def _exchange_done(traffic: _Traffic, devices: _DeviceTimes) -> None:
    if traffic.last_exchange_size:  # an empty exchange leaves the grid's last timing as it was
        devices.add_last_exchange()


def _run_training(
    rounds: TrainRound,
    grid: Grid,
    traffic: _Traffic,
    devices: _DeviceTimes,
    timeout: float | None,
    *,
    stream: bool,
) -> TrainResult:
    """Drive a :data:`TrainRound` to its end, one exchange at a time."""
    try:
        messages = next(rounds)
        while True:
            replies = _exchange(grid, messages, traffic, devices, timeout, stream=stream)
            messages = rounds.send(replies)
            for _ in replies:  # replies the strategy left unread still count
                pass
    except StopIteration as done:
        return done.value


def run_rounds(
    *,
    strategy: Strategy,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: EvaluateFn | None = None,
    eval_every: int = 1,
    timeout: float | None = None,
    observers: Sequence[RoundObserver] = (),
    checkpoint: RunCheckpoint | None = None,
) -> ArrayRecord:
    """Run ``num_rounds`` rounds of ``strategy`` on ``grid``; return the final arrays.

    Centralized evaluation runs before the first round, every ``eval_every``
    rounds and after the last. A round whose replies all fail keeps the previous
    global arrays. With ``checkpoint``, a saved run continues after its last
    saved round (strategy and grid state restored), and every round is saved.
    """
    start = time.perf_counter()

    def central(round_: int, arrays: ArrayRecord) -> dict[str, float]:
        due = round_ in (0, num_rounds) or round_ % eval_every == 0
        result = evaluate_fn(round_, arrays) if (evaluate_fn and due) else None
        return _floats(result)

    stream = streams_replies(strategy)
    saved = checkpoint.restore(strategy, grid) if checkpoint is not None else None
    if saved is None:
        arrays, first_round = initial_arrays, 1
        _notify(
            observers,
            RoundReport(round=0, num_rounds=num_rounds, central=central(0, initial_arrays)),
        )
    else:
        arrays, first_round = saved.arrays, saved.round + 1
    for round_ in range(first_round, num_rounds + 1):
        round_start = time.perf_counter()
        devices, traffic = _DeviceTimes(grid), _Traffic()
        new_arrays, train_metrics = _run_training(
            train_exchanges(strategy, round_, arrays, train_config, grid),
            grid,
            traffic,
            devices,
            timeout,
            stream=stream,
        )
        arrays = new_arrays if new_arrays is not None else arrays
        evaluate_replies = _exchange(
            grid,
            strategy.configure_evaluate(round_, arrays, evaluate_config or ConfigRecord(), grid),
            traffic,
            devices,
            timeout,
            stream=stream,
        )
        evaluate_metrics = strategy.aggregate_evaluate(round_, evaluate_replies)
        for _ in evaluate_replies:
            pass
        report = RoundReport(
            round=round_,
            num_rounds=num_rounds,
            train=_floats(train_metrics),
            evaluate=_floats(evaluate_metrics),
            central=central(round_, arrays),
            replies=traffic.replies,
            failures=traffic.failures,
            round_s=time.perf_counter() - round_start,
            elapsed_s=time.perf_counter() - start,
            simulated_s=devices.simulated_s,
            unavailable=devices.unavailable,
            late=devices.late,
            exchanges=traffic.exchanges,
            downlink_floats=traffic.downlink_floats,
            uplink_floats=traffic.uplink_floats,
            privacy=dict(strategy.privacy()) if isinstance(strategy, ReportsPrivacy) else {},
            failure_kinds=dict(sorted(traffic.failure_kinds.items())),
        )
        _notify(observers, report)
        if checkpoint is not None:
            checkpoint.save(round_, arrays, strategy, grid)
    return arrays


def _floats(record: MetricRecord | None) -> dict[str, float]:
    """Scalar entries of a MetricRecord (list-valued metrics are left out of reports)."""
    return {k: float(v) for k, v in (record or {}).items() if isinstance(v, int | float)}


def _notify(observers: Sequence[RoundObserver], report: RoundReport) -> None:
    for observer in observers:
        observer.on_round(report)
