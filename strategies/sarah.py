"""Distributed SARAH (Nguyen et al., ICML 2017), a baseline of Murata & Suzuki (ICML 2021).

A stage starts with v = mean_p of each worker's large-batch gradient at the
anchor; each later round refreshes v <- v + mean_p [g(x_t; I_p) - g(x_{t-1}; I_p)]
on ONE minibatch I_p per worker evaluated at both points, and steps
x_{t+1} = x_t - η v. Workers remember x_{t-1} in ``Context.state``, so one
exchange per round carries d each way per worker. The stage restarts every
``stage_rounds`` rounds.

BVR-L-SGD (``bvr_l_sgd.py``) refreshes its estimate the same way: both hold a
:class:`SarahEstimate`.
"""

from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid

from fedsim import keys
from fedsim.algorithm import ClientAction
from fedsim.arrays import to_array_record
from fedsim.clients import TorchClient
from fedsim.clients.points import (
    batch_generator,
    config_of,
    local_data,
    model_for,
    point_of,
    remember_point,
    reply_with,
    tensors,
)
from fedsim.clients.trainer import trainer_for
from fedsim.loop import TrainRound
from fedsim.records import config_number, records_of
from fedsim.strategies.aggregation import dtypes_of, shapes_of
from fedsim.strategies.minibatch_sgd import gradient
from fedsim.strategies.multi_exchange import (
    GradientStrategy,
    Vector,
    refusals,
    shapes_and_vector,
    step,
)

EstimateRefresh = Generator[list[Message], Iterable[Message], tuple[MetricRecord | None, list[int]]]


def anchor(client: TorchClient, message: Message, context: Context) -> Message:
    """Client action ``train.anchor``: reply g(x; Ĩ) at a stage's anchor and remember x."""
    reply = gradient(client, message, context)
    remember_point(context, message)
    return reply


def estimate(client: TorchClient, message: Message, context: Context) -> Message:
    """Client action ``train.estimate``: reply g(x_t; I) - g(x_{t-1}; I) on one minibatch I.

    x_{t-1} is the point this node remembered from its previous exchange; x_t
    replaces it.
    """
    previous = records_of(context.state, ArrayRecord).get(keys.PREVIOUS_POINT)
    if previous is None:
        raise RuntimeError("this node has no previous point: it missed its stage's anchor exchange")
    point, data = point_of(client, message), local_data(client, context)
    trainer = trainer_for(client.task, message, context)
    batch_size = config_number(config_of(message), keys.BATCH_SIZE, int)
    batch = trainer.batch(data, batch_size, batch_generator(message, context))
    difference, loss = trainer.difference(
        model_for(client, point), client.task.loss_fn, point, tensors(client, previous), batch
    )
    remember_point(context, message)
    return reply_with(message, {keys.ARRAYS: difference}, loss, len(data), trainer.spend(context))


@dataclass
class SarahEstimate:
    """The SARAH recursion's estimate v, and the exchange that refreshes it each round.

    SARAH and BVR-L-SGD both hold one: a stage's first round asks every worker
    for its large-batch gradient at the anchor (``train.anchor``), later rounds
    for g(x_t; I) - g(x_{t-1}; I) on one minibatch (``train.estimate``).
    """

    stage_rounds: int
    reference_batch_size: int
    value: Vector | None = None  # v (ṽ_t) after the last round

    def __post_init__(self) -> None:
        if self.stage_rounds < 1:
            raise ValueError(f"stage_rounds must be >= 1, got {self.stage_rounds}")
        if self.reference_batch_size < 0:
            raise ValueError(f"reference_batch_size must be >= 0, got {self.reference_batch_size}")

    def refresh(
        self,
        strategy: GradientStrategy,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        *,
        batch_size: int,
    ) -> EstimateRefresh:
        """Run the anchor (stage start) or recursion exchange at ``arrays``; update v.

        ``batch_size`` is the recursion's minibatch. Returns the workers' mean
        metrics and the nodes that counted (none: v is unchanged).
        """
        stage_start = (server_round - 1) % self.stage_rounds == 0 or self.value is None
        message_type, size = (
            (keys.TRAIN_ANCHOR, self.reference_batch_size)
            if stage_start
            else (keys.TRAIN_ESTIMATE, batch_size)
        )
        replies = yield strategy.send(
            server_round,
            strategy.workers(server_round, grid),
            message_type,
            strategy.exchange_config(config, batch_size=size),
            **{keys.ARRAYS: arrays},
        )
        means, metrics, counted = strategy.mean_of_replies(
            replies, shapes_of(arrays), keys.ARRAYS, dtypes=dtypes_of(arrays)
        )
        if counted:
            previous = self.value
            self.value = (
                means[0]
                if stage_start or previous is None
                else {name: previous[name] + means[0][name] for name in previous}
            )
        return metrics, counted


@dataclass(kw_only=True, eq=False)
class SARAH(GradientStrategy):
    """SARAH on the parameters of :class:`GradientStrategy`, plus these.

    Parameters
    ----------
    stage_rounds
        T, rounds per stage; each stage starts with an anchor exchange.
    reference_batch_size
        b̃, samples of each worker's anchor gradient; 0 takes its full local data.
    """

    stage_rounds: int
    reference_batch_size: int = 0

    client_actions = (
        ClientAction(keys.TRAIN_ANCHOR, anchor),
        ClientAction(keys.TRAIN_ESTIMATE, estimate),
    )
    privacy_refusals = refusals("SARAH", "train.anchor, train.estimate")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sarah = SarahEstimate(self.stage_rounds, self.reference_batch_size)

    @property
    def estimate(self) -> Vector | None:
        """The server's estimate v after the last round."""
        return self.sarah.value

    def state_dict(self) -> dict[str, Any]:
        """Return the server's estimate, for run checkpoints."""
        return {"estimate": self.sarah.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the estimate from :meth:`state_dict`."""
        self.sarah.value = state["estimate"]

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Refresh the estimate on minibatches of B and step the global point along it."""
        metrics, counted = yield from self.sarah.refresh(
            self, server_round, arrays, config, grid, batch_size=self.batch_size
        )
        if not counted or self.sarah.value is None:
            return None, None
        _, point = shapes_and_vector(arrays)
        return to_array_record(step(point, self.sarah.value, self.lr)), metrics
