"""Base of strategies whose rounds take several exchanges (BVR-L-SGD and its baselines).

Flower's ``Strategy`` has one configure/aggregate pair per round. A strategy
derived from :class:`GradientStrategy` instead writes its round as a generator
(``train_round``) that yields each exchange's messages and receives the replies;
``fedsim.loop.run_rounds`` drives it, so progress, metrics, seeding and traffic
counts stay in the loop. ``start`` runs that same loop, so the strategy also works
in a plain Flower ``ServerApp`` on Flower's deployment runtime.

These strategies follow the paper's notation: the objective is the *unweighted*
mean of the workers' losses, f = (1/P) sum_p f_p, so every mean below is over
workers, not examples; and the global model is a point x of parameters (no
buffers).
"""

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedsim import keys
from fedsim.arrays import arrays_of, to_array_record
from fedsim.checkpoint import Stateful
from fedsim.engine.replies import streams_replies
from fedsim.loop import RoundReport, TrainRound, run_rounds
from fedsim.records import get_record, records_of
from fedsim.seeding import SERVER_NODE, numpy_rng
from fedsim.strategies.aggregation import (
    InvalidReplyError,
    WeightedMean,
    metric_values,
    reply_arrays,
    shapes_of,
    to_metric_record,
)
from fedsim.strategies.fedavg import addressed, mean_metrics, skip_reply, valid_replies
from fedsim.strategies.sampling import CohortSampler

if TYPE_CHECKING:  # it imports Opacus's accountants: only the DP wrappers load it
    from fedsim.strategies.gaussian_sum_release import GaussianSumRelease

Vector = dict[str, np.ndarray]
logger = logging.getLogger(__name__)


def refusals(strategy: str, message_types: str) -> dict[str, str]:
    """Why a multi-exchange strategy refuses local and central DP and secure aggregation.

    It honours DP-SGD.
    """
    return {
        "privacy.local_dp": (
            f"the local privatizer privatizes the model of a plain 'train' reply; {strategy}'s "
            f"clients answer {message_types}"
        ),
        "privacy.central_dp": (
            f"central DP replaces a one-exchange strategy's aggregation; {strategy} runs "
            "several exchanges of its own per round"
        ),
        "privacy.secure_aggregation": (
            f"secure aggregation masks the model of a plain 'train' reply and sums it; "
            f"{strategy}'s clients answer {message_types}"
        ),
    }


class RunsItsOwnRounds:
    """Mixin of the strategies driven by ``train_round``.

    It refuses Flower's one-exchange API and provides ``start`` on fedsim's loop,
    so they still work wherever Flower calls ``strategy.start`` (a ServerApp on
    the deployment runtime).
    """

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Run one round's exchanges; subclasses implement it."""
        raise NotImplementedError

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Refuse: a round of this strategy is several exchanges (see ``train_round``)."""
        raise self._not_one_exchange()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Refuse, as :meth:`configure_train` does."""
        raise self._not_one_exchange()

    def _not_one_exchange(self) -> TypeError:
        return TypeError(
            f"{type(self).__name__} runs several exchanges per round: drive it with "
            "strategy.start(...) or fedsim.loop.run_rounds, not configure_train/aggregate_train"
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run the strategy on ``grid`` as Flower's ``Strategy.start`` does, with fedsim's loop."""
        result = Result()

        class _Collect:
            def on_round(self, report: RoundReport) -> None:
                for store, metrics in (
                    (result.train_metrics_clientapp, report.train),
                    (result.evaluate_metrics_clientapp, report.evaluate),
                    (result.evaluate_metrics_serverapp, report.central),
                ):
                    if metrics:
                        store[report.round] = MetricRecord(dict(metrics))

        result.arrays = run_rounds(
            strategy=cast(Strategy, self),
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=num_rounds,
            train_config=train_config or ConfigRecord(),
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
            timeout=timeout,
            observers=[_Collect()],
        )
        return result


class WrapsStrategy(RunsItsOwnRounds, Strategy):
    """Base of wrappers (central DP, secure aggregation) around a one-exchange strategy.

    The wrapper runs its own training round; the inner strategy, held in
    ``self.strategy``, keeps federated evaluation and the summary. A wrapper that
    releases its aggregate with differential privacy holds the mechanism in
    ``self.release`` (a ``GaussianSumRelease``): the loop reports its
    :meth:`privacy` each round, and a checkpoint saves it beside the inner state.
    """

    strategy: Strategy
    release: "GaussianSumRelease | None" = None

    @property
    def streams_replies(self) -> bool:
        """Stream replies when the inner strategy does: it aggregates federated evaluation."""
        return streams_replies(self.strategy)

    @property
    def weight_key(self) -> str:
        """The metric the inner strategy weights replies by (Flower's FedAvg family names it)."""
        return str(getattr(self.strategy, "weighted_by_key", keys.NUM_EXAMPLES))

    def training_content(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> tuple[list[Message], RecordDict]:
        """Return the inner strategy's training messages and their shared content.

        The content (model and config, the config stamped with the round) is the
        same for the whole cohort, as FedAvg's is; the wrapper addresses it itself.
        An inner cohort of none still gives the model and ``config``.
        """
        instructions = list(self.strategy.configure_train(server_round, arrays, config, grid))
        content = instructions[0].content if instructions else RecordDict({keys.ARRAYS: arrays})
        round_config = records_of(content, ConfigRecord).get(keys.CONFIG, config)
        round_config = ConfigRecord({**round_config, keys.SERVER_ROUND: server_round})
        return instructions, RecordDict({**content, keys.CONFIG: round_config})

    def step_inner(
        self, server_round: int, model: dict[str, np.ndarray], weight: float
    ) -> ArrayRecord | None:
        """Hand ``model`` (the privately aggregated one) to the inner strategy as its only reply.

        The inner strategy's mean of one reply is that model; its server step
        (FedAvg's, FedAdam's) then applies as usual.
        """
        content = RecordDict(
            {
                keys.ARRAYS: to_array_record(model),
                keys.METRICS: MetricRecord({self.weight_key: weight}),
            }
        )
        new_arrays, _ = self.strategy.aggregate_train(
            server_round, [Message(content, SERVER_NODE, MessageType.TRAIN)]
        )
        return new_arrays

    def privacy(self) -> dict[str, float]:
        """Return the ε spent so far at δ; nothing without a DP release."""
        return self.release.privacy() if self.release is not None else {}

    def state_dict(self) -> dict[str, Any]:
        """Return the inner strategy's state (when it has one) and the release's."""
        inner = self.strategy.state_dict() if isinstance(self.strategy, Stateful) else None
        if self.release is None:
            return {"inner": inner}
        return {"inner": inner, "release": self.release.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state["inner"] is not None and isinstance(self.strategy, Stateful):
            self.strategy.load_state_dict(state["inner"])
        if self.release is not None:
            self.release.load_state_dict(state["release"])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy configure federated evaluation."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Let the inner strategy aggregate federated evaluation."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        self.strategy.summary()


@dataclass(kw_only=True, eq=False)
class GradientStrategy(RunsItsOwnRounds, Strategy):
    """Base of BVR-L-SGD and its baselines: hyperparameters, worker cohorts, reply means.

    Cohorts come from a :class:`CohortSampler` and federated evaluation is
    FedAvg's (``addressed``, ``mean_metrics``), both by composition.

    Parameters
    ----------
    lr
        Step size η (sent to clients for local steps, used by the server for
        server-side steps).
    batch_size
        Minibatch size b of local steps, or B of the non-local methods' gradients.
    local_steps
        K, the number of local steps per round (local methods).
    seed, fraction_train, min_train_nodes, fraction_evaluate, min_evaluate_nodes, \
min_available_nodes
        The cohorts, as for :class:`fedsim.strategies.FedAvg`; the paper's experiments
        use every worker each round (``fraction_train=1``).
    """

    lr: float
    batch_size: int
    local_steps: int = 1
    seed: int = 0
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    fraction_evaluate: float = 1.0
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2

    # Means over workers, each reply once, in any order: replies may stream.
    streams_replies: ClassVar[bool] = True
    # Every client action computes through the task's trainer (``trainer_for``), which
    # clips and noises each query under DP-SGD; privacy_refusals says why not the others.
    honours_privacy: ClassVar[frozenset[str]] = frozenset({"client.dp_sgd"})

    def __post_init__(self) -> None:
        for name in ("lr", "batch_size", "local_steps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        self.cohorts = CohortSampler(
            seed=self.seed,
            fraction_train=self.fraction_train,
            min_train_nodes=self.min_train_nodes,
            fraction_evaluate=self.fraction_evaluate,
            min_evaluate_nodes=self.min_evaluate_nodes,
            min_available_nodes=self.min_available_nodes,
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluate the global point on a seeded cohort, as FedAvg does."""
        cohort = self.cohorts.sample(server_round, grid, train=False)
        return addressed(server_round, {keys.ARRAYS: arrays}, config, cohort, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean of the evaluation metrics, as FedAvg takes it."""
        return mean_metrics(replies, keys.NUM_EXAMPLES)

    def summary(self) -> None:
        """Log the strategy's settings."""
        logger.info("%s: lr %g, batch %d, K %d, %s", type(self).__name__, self.lr,
                    self.batch_size, self.local_steps, self.cohorts)  # fmt: skip

    # ------------------------------------------------------------------ helpers

    def workers(self, server_round: int, grid: Grid) -> list[int]:
        """Return the round's workers: a seeded cohort (all nodes by default)."""
        return self.cohorts.sample(server_round, grid, train=True)

    def exchange_config(
        self, config: ConfigRecord, *, batch_size: int | None = None, lr: float | None = None
    ) -> ConfigRecord:
        """Return the config of one exchange: the run's (seed) plus this strategy's settings."""
        return ConfigRecord(
            {
                **config,
                keys.LR: self.lr if lr is None else lr,
                keys.BATCH_SIZE: self.batch_size if batch_size is None else batch_size,
                keys.LOCAL_STEPS: self.local_steps,
            }
        )

    def send(
        self,
        server_round: int,
        node_ids: Iterable[int],
        message_type: str,
        config: ConfigRecord,
        **records: ArrayRecord,
    ) -> list[Message]:
        """Address one RecordDict (config plus named array records) to every node."""
        return addressed(server_round, records, config, node_ids, message_type)

    def mean_of_replies(
        self,
        replies: Iterable[Message],
        shapes: dict[str, tuple[int, ...]],
        *names: str,
        dtypes: dict[str, np.dtype] | None = None,
    ) -> tuple[list[Vector], MetricRecord | None, list[int]]:
        """Return the unweighted mean over valid replies of each named array record.

        Also returns the mean metrics and the ids of the nodes whose replies
        counted. Error and malformed replies are logged and skipped. ``dtypes``
        (the model's) are the means' dtypes; ``None`` takes the first reply's.
        """
        means = [WeightedMean(shapes, dtypes=dtypes) for _ in names]
        metrics = WeightedMean()
        counted = []
        for reply, vectors, metric_vals in self._unpacked(replies, names):
            try:
                terms = [mean.check(v, 1.0) for mean, v in zip(means, vectors, strict=True)]
                metric_term = metrics.check(metric_vals, 1.0)
            except InvalidReplyError as exc:
                skip_reply(reply, str(exc))
                continue
            for mean, term in zip(means, terms, strict=True):
                mean.add_checked(term)
            metrics.add_checked(metric_term)
            counted.append(reply.metadata.src_node_id)
        if not counted:
            return [], None, []
        return [mean.mean() for mean in means], to_metric_record(metrics.mean()), counted

    def _unpacked(
        self, replies: Iterable[Message], names: tuple[str, ...]
    ) -> Iterator[tuple[Message, list[Vector], dict[str, np.ndarray]]]:
        for reply in valid_replies(replies):
            try:
                vectors = [
                    reply_arrays(get_record(reply.content, name, ArrayRecord)) for name in names
                ]
                metric_record = get_record(reply.content, keys.METRICS, MetricRecord)
                metric_vals = metric_values(metric_record, exclude=keys.NUM_EXAMPLES)
            except (KeyError, InvalidReplyError) as exc:
                skip_reply(reply, str(exc))
                continue
            yield reply, vectors, metric_vals

    def pick(self, server_round: int, node_ids: list[int], purpose: str = "pick") -> int:
        """Draw one node uniformly from ``node_ids`` with a generator seeded by the round."""
        rng = numpy_rng(self.seed, server_round, SERVER_NODE, purpose)
        return node_ids[int(rng.integers(len(node_ids)))]


def shapes_and_vector(arrays: ArrayRecord) -> tuple[dict[str, tuple[int, ...]], Vector]:
    """Return the model's shapes and its arrays as writable NumPy copies."""
    return shapes_of(arrays), {name: np.array(value) for name, value in arrays_of(arrays).items()}


def step(point: Vector, direction: Vector, lr: float) -> Vector:
    """Return point - lr * direction, in the point's dtype."""
    return {name: (point[name] - lr * direction[name]).astype(point[name].dtype) for name in point}
