"""Distributed SARAH (Nguyen et al., ICML 2017), a baseline of Murata & Suzuki (ICML 2021).

A stage starts with v = mean_p of each worker's large-batch gradient at the
anchor; each later round refreshes v <- v + mean_p [g(x_t; I_p) - g(x_{t-1}; I_p)]
on ONE minibatch I_p per worker evaluated at both points, and steps
x_{t+1} = x_t - η v. Workers remember x_{t-1} in ``Context.state``, so one
exchange per round carries d each way per worker. The stage restarts every
``stage_rounds`` rounds.

BVR-L-SGD (``bvr_l_sgd.py``) refreshes its estimate the same way; it subclasses
this class for :meth:`SARAH.refresh_estimate`.
"""

from collections.abc import Generator, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedsim import keys
from fedsim.arrays import to_array_record
from fedsim.loop import TrainRound
from fedsim.strategies.aggregation import shapes_of
from fedsim.strategies.multi_exchange import GradientStrategy, Vector, shapes_and_vector, step

EstimateRefresh = Generator[list[Message], Iterable[Message], tuple[MetricRecord | None, list[int]]]


class SARAH(GradientStrategy):
    """SARAH on the parameters of :class:`GradientStrategy`, plus these.

    Parameters
    ----------
    stage_rounds
        T, rounds per stage; each stage starts with an anchor exchange.
    reference_batch_size
        b̃, samples of each worker's anchor gradient; 0 takes its full local data.
    """

    def __init__(
        self, *, stage_rounds: int, reference_batch_size: int = 0, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if stage_rounds < 1:
            raise ValueError(f"stage_rounds must be >= 1, got {stage_rounds}")
        if reference_batch_size < 0:
            raise ValueError(f"reference_batch_size must be >= 0, got {reference_batch_size}")
        self.stage_rounds = stage_rounds
        self.reference_batch_size = reference_batch_size
        self.estimate: Vector | None = None  # v (ṽ_t) after the last round

    def state_dict(self) -> dict[str, Any]:
        """Return the server's estimate, for run checkpoints."""
        return {"estimate": self.estimate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the estimate from :meth:`state_dict`."""
        self.estimate = state["estimate"]

    @property
    def estimate_batch_size(self) -> int:
        """Samples per worker of a round's recursion step: B."""
        return self.batch_size

    def refresh_estimate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> EstimateRefresh:
        """Run the anchor (stage start) or recursion exchange at ``arrays``; update the estimate.

        Returns the workers' mean metrics and the nodes that counted (none: the
        estimate is unchanged).
        """
        stage_start = (server_round - 1) % self.stage_rounds == 0 or self.estimate is None
        message_type, batch_size = (
            (keys.TRAIN_ANCHOR, self.reference_batch_size)
            if stage_start
            else (keys.TRAIN_ESTIMATE, self.estimate_batch_size)
        )
        replies = yield self.send(
            server_round,
            self.workers(server_round, grid),
            message_type,
            self.exchange_config(config, batch_size=batch_size),
            **{keys.ARRAYS: arrays},
        )
        means, metrics, counted = self.mean_of_replies(replies, shapes_of(arrays), keys.ARRAYS)
        if counted:
            previous = self.estimate
            self.estimate = (
                means[0]
                if stage_start or previous is None
                else {name: previous[name] + means[0][name] for name in previous}
            )
        return metrics, counted

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Refresh the estimate and step the global point along it."""
        metrics, counted = yield from self.refresh_estimate(server_round, arrays, config, grid)
        if not counted or self.estimate is None:
            return None, None
        _, point = shapes_and_vector(arrays)
        return to_array_record(step(point, self.estimate, self.lr)), metrics
