"""Federated Averaging (McMahan et al., AISTATS 2017, https://arxiv.org/abs/1602.05629).

Flower's message-based FedAvg, on Flower's ``Strategy``, with two changes that matter
in simulation:

* the cohort is drawn from a generator seeded by ``(seed, round)``, not from the
  global ``random`` module, so a run replays exactly and any round can be
  reproduced in isolation;
* aggregation streams: each reply is folded into a running weighted sum and
  dropped, so memory is O(model) rather than O(cohort x model), and a malformed
  reply (wrong shape, NaN, missing weight) is skipped instead of failing the round.
"""

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim import keys
from fedsim.algorithm import PRIVACY_OPTIONS
from fedsim.arrays import to_array_record
from fedsim.records import records_of
from fedsim.strategies.aggregation import (
    InvalidReplyError,
    WeightedMean,
    dtypes_of,
    metric_values,
    reply_arrays,
    shapes_of,
    to_metric_record,
)
from fedsim.strategies.sampling import CohortSampler

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, eq=False)
class FedAvg(Strategy):
    """FedAvg with seeded cohorts (a :class:`CohortSampler`) and streaming aggregation.

    The cohort settings are Flower's FedAvg's, plus ``seed``; the arrays and the
    metrics of the replies are averaged, weighted by ``weighted_by_key``, by the
    same streaming :class:`WeightedMean`.
    """

    seed: int = 0
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    fraction_evaluate: float = 1.0
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    weighted_by_key: str = keys.NUM_EXAMPLES

    #: The float64 running mean reads each reply once and does not depend on their
    #: order, so fedsim's loop hands replies over as they arrive (``fedsim.engine.replies``).
    streams_replies: ClassVar[bool] = True
    #: Its clients train through ``TorchClient.train`` (DP-SGD when the task asks for it)
    #: and reply a model to a plain ``train`` message, which the local privatizer handles
    #: and central DP aggregates.
    honours_privacy: ClassVar[frozenset[str]] = frozenset(PRIVACY_OPTIONS)

    def __post_init__(self) -> None:
        self.cohorts = CohortSampler(
            seed=self.seed,
            fraction_train=self.fraction_train,
            min_train_nodes=self.min_train_nodes,
            fraction_evaluate=self.fraction_evaluate,
            min_evaluate_nodes=self.min_evaluate_nodes,
            min_available_nodes=self.min_available_nodes,
        )
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._dtypes: dict[str, np.dtype] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample a seeded cohort and send it the global arrays."""
        self._shapes, self._dtypes = shapes_of(arrays), dtypes_of(arrays)
        cohort = self.cohorts.sample(server_round, grid, train=True)
        return addressed(server_round, {keys.ARRAYS: arrays}, config, cohort, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample a seeded cohort to evaluate the global arrays."""
        cohort = self.cohorts.sample(server_round, grid, train=False)
        return addressed(server_round, {keys.ARRAYS: arrays}, config, cohort, MessageType.EVALUATE)

    def summary(self) -> None:
        """Log the strategy's settings."""
        name, weight = type(self).__name__, self.weighted_by_key
        logger.info("%s: %s, weighted by %r", name, self.cohorts, weight)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold each valid reply into running weighted means of arrays and metrics."""
        arrays, metrics = WeightedMean(self._shapes, dtypes=self._dtypes), WeightedMean()
        for reply in valid_replies(replies):
            try:
                weight, metric_vals, array_vals = unpack(
                    reply.content, self.weighted_by_key, with_arrays=True
                )
                # Metrics are checked first: once its arrays are added, the reply counts.
                metric_term = metrics.check(metric_vals, weight)
                arrays.add(array_vals, weight)
            except InvalidReplyError as exc:
                skip_reply(reply, str(exc))
                continue
            metrics.add_checked(metric_term)
        if arrays.count == 0:
            return None, None
        return to_array_record(arrays.mean()), to_metric_record(metrics.mean())

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean of the evaluation metrics of valid replies."""
        return mean_metrics(replies, self.weighted_by_key)


def skip_reply(reply: Message, reason: str) -> None:
    """Log why a reply does not count; strategies skip it and go on."""
    logger.warning("Skipping reply from node %d: %s", reply.metadata.src_node_id, reason)


def addressed(
    server_round: int,
    records: Mapping[str, ArrayRecord],
    config: ConfigRecord,
    node_ids: Iterable[int],
    message_type: str,
) -> list[Message]:
    """Address the array records and the config, stamped with the round, to each node.

    The cohort shares one RecordDict: the engines hand each client its own
    shallow copy, and one copy per message goes over a network.
    """
    round_config = ConfigRecord({**config, keys.SERVER_ROUND: server_round})
    content = RecordDict({**records, keys.CONFIG: round_config})
    return [Message(content, node_id, message_type) for node_id in node_ids]


def mean_metrics(replies: Iterable[Message], weight_key: str) -> MetricRecord | None:
    """Return the weighted mean of the valid replies' metrics (federated evaluation)."""
    metrics = WeightedMean()
    for reply in valid_replies(replies):
        try:
            weight, metric_vals, _ = unpack(reply.content, weight_key, with_arrays=False)
            metrics.add(metric_vals, weight)
        except InvalidReplyError as exc:
            skip_reply(reply, str(exc))
    return to_metric_record(metrics.mean()) if metrics.count else None


def unpack(
    content: RecordDict, weight_key: str, *, with_arrays: bool
) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split a reply into (weight, metrics, arrays), checking its structure."""
    metric_records = records_of(content, MetricRecord)
    if len(metric_records) != 1:
        raise InvalidReplyError(f"expected one MetricRecord, got {len(metric_records)}")
    metric_record = next(iter(metric_records.values()))
    if weight_key not in metric_record:
        raise InvalidReplyError(f"MetricRecord lacks the weight {weight_key!r}")
    weight = metric_record[weight_key]
    if isinstance(weight, list):
        raise InvalidReplyError(f"weight {weight_key!r} must be a number")
    array_vals: dict[str, np.ndarray] = {}
    if with_arrays:
        array_records = records_of(content, ArrayRecord)
        if len(array_records) != 1:
            raise InvalidReplyError(f"expected one ArrayRecord, got {len(array_records)}")
        array_vals = reply_arrays(next(iter(array_records.values())))
    return weight, metric_values(metric_record, exclude=weight_key), array_vals


def valid_replies(replies: Iterable[Message]) -> Iterator[Message]:
    """Yield replies that carry content; log and skip error replies."""
    for reply in replies:
        if reply.has_error():
            skip_reply(reply, reply.error.reason or f"error code {reply.error.code}")
        else:
            yield reply
