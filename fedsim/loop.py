"""The round loop: the one place where a federation advances, whatever the engine.

It drives any ``flwr.serverapp.strategy.Strategy`` exactly as Flower's
``Strategy.start`` does (configure -> ``grid.send_and_receive`` -> aggregate, for
training then evaluation, then centralized evaluation), and adds what a
simulation user needs around each round: timing, reply and failure counts, and
a :class:`RoundReport` handed to observers (progress bar, metrics files).
"""

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


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

    def as_row(self) -> dict[str, object]:
        """Return a flat JSON-ready row with ``train_*``, ``evaluate_*``, ``central_*`` metrics."""
        row = {k: v for k, v in asdict(self).items() if k not in ("train", "evaluate", "central")}
        for group in ("train", "evaluate", "central"):
            row.update({f"{group}_{k}": v for k, v in getattr(self, group).items()})
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


class _CountedReplies:
    """Pass replies through to the strategy, counting replies and error replies."""

    def __init__(self, replies: Iterable[Message]) -> None:
        self._replies = replies
        self.count = 0
        self.failures = 0

    def __iter__(self) -> Iterator[Message]:
        for reply in self._replies:
            self.count += 1
            self.failures += reply.has_error()
            yield reply


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
) -> ArrayRecord:
    """Run ``num_rounds`` rounds of ``strategy`` on ``grid``; return the final arrays.

    Centralized evaluation runs before the first round, every ``eval_every``
    rounds and after the last. A round whose replies all fail keeps the previous
    global arrays.
    """
    start = time.perf_counter()

    def central(round_: int, arrays: ArrayRecord) -> dict[str, float]:
        due = round_ in (0, num_rounds) or round_ % eval_every == 0
        result = evaluate_fn(round_, arrays) if (evaluate_fn and due) else None
        return _floats(result)

    _notify(
        observers, RoundReport(round=0, num_rounds=num_rounds, central=central(0, initial_arrays))
    )
    arrays = initial_arrays
    for round_ in range(1, num_rounds + 1):
        round_start = time.perf_counter()
        devices = _DeviceTimes(grid)
        replies = _CountedReplies(
            grid.send_and_receive(
                strategy.configure_train(round_, arrays, train_config, grid), timeout=timeout
            )
        )
        new_arrays, train_metrics = strategy.aggregate_train(round_, replies)
        devices.add_last_exchange()
        arrays = new_arrays if new_arrays is not None else arrays
        evaluate_metrics = strategy.aggregate_evaluate(
            round_,
            grid.send_and_receive(
                strategy.configure_evaluate(
                    round_, arrays, evaluate_config or ConfigRecord(), grid
                ),
                timeout=timeout,
            ),
        )
        if evaluate_metrics is not None:
            devices.add_last_exchange()
        report = RoundReport(
            round=round_,
            num_rounds=num_rounds,
            train=_floats(train_metrics),
            evaluate=_floats(evaluate_metrics),
            central=central(round_, arrays),
            replies=replies.count,
            failures=replies.failures,
            round_s=time.perf_counter() - round_start,
            elapsed_s=time.perf_counter() - start,
            simulated_s=devices.simulated_s,
            unavailable=devices.unavailable,
            late=devices.late,
        )
        _notify(observers, report)
    return arrays


def _floats(record: MetricRecord | None) -> dict[str, float]:
    """Scalar entries of a MetricRecord (list-valued metrics are left out of reports)."""
    return {k: float(v) for k, v in (record or {}).items() if isinstance(v, int | float)}


def _notify(observers: Sequence[RoundObserver], report: RoundReport) -> None:
    for observer in observers:
        observer.on_round(report)
