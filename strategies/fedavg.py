"""Federated Averaging (McMahan et al., AISTATS 2017, https://arxiv.org/abs/1602.05629).

Flower's message-based FedAvg with two changes that matter in simulation:

* the cohort is drawn from a generator seeded by ``(seed, round)``, not from the
  global ``random`` module, so a run replays exactly and any round can be
  reproduced in isolation;
* aggregation streams: each reply is folded into a running weighted sum and
  dropped, so memory is O(model) rather than O(cohort x model), and a malformed
  reply (wrong shape, NaN, missing weight) is skipped instead of failing the round.
"""

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedsim import keys
from fedsim.arrays import arrays_of, to_array_record
from fedsim.records import records_of
from fedsim.seeding import SERVER_NODE, numpy_rng
from fedsim.strategies.aggregation import (
    InvalidReplyError,
    WeightedMean,
    metric_values,
    shapes_of,
    to_metric_record,
)
from fedsim.strategies.sampling import available_nodes, sample_cohort

logger = logging.getLogger(__name__)


class FedAvg(FlowerFedAvg):
    """FedAvg with seeded sampling and streaming aggregation.

    Takes every argument of :class:`flwr.serverapp.strategy.FedAvg` (the custom
    ``*_metrics_aggr_fn`` hooks excepted: metrics are averaged by the same
    streaming mean as arrays) plus ``seed``.
    """

    #: The float64 running mean reads each reply once and does not depend on their
    #: order, so fedsim's loop hands replies over as they arrive (``fedsim.engine.replies``).
    streams_replies = True

    def __init__(self, *, seed: int = 0, **flower_kwargs: object) -> None:
        super().__init__(**flower_kwargs)  # type: ignore[arg-type]
        self.seed = seed
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample a seeded cohort and send it the global arrays."""
        self._shapes = shapes_of(arrays)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._configure(server_round, record, grid, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample a seeded cohort to evaluate the global arrays."""
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._configure(server_round, record, grid, MessageType.EVALUATE)

    def _configure(
        self, server_round: int, record: RecordDict, grid: Grid, message_type: str
    ) -> list[Message]:
        cohort = self._cohort(server_round, grid, train=message_type == MessageType.TRAIN)
        return self._messages(server_round, record, cohort, message_type)

    def _cohort(self, server_round: int, grid: Grid, *, train: bool) -> list[int]:
        """Draw the round's training (or evaluation) cohort from a seeded generator."""
        fraction = self.fraction_train if train else self.fraction_evaluate
        minimum = self.min_train_nodes if train else self.min_evaluate_nodes
        if fraction == 0.0:
            return []
        node_ids = available_nodes(grid, max(self.min_available_nodes, minimum))
        size = min(max(int(len(node_ids) * fraction), minimum), len(node_ids))
        purpose = f"sample-{MessageType.TRAIN if train else MessageType.EVALUATE}"
        cohort = sample_cohort(
            node_ids, size, numpy_rng(self.seed, server_round, SERVER_NODE, purpose)
        )
        logger.debug("%s: sampled %d of %d nodes", purpose, len(cohort), len(node_ids))
        return cohort

    def _messages(
        self, server_round: int, record: RecordDict, node_ids: Iterable[int], message_type: str
    ) -> list[Message]:
        """Address ``record`` to each node, stamping the round into its config."""
        record.config_records[self.configrecord_key][keys.SERVER_ROUND] = server_round
        return [Message(record, node_id, message_type) for node_id in node_ids]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold each valid reply into running weighted means of arrays and metrics."""
        arrays, metrics = WeightedMean(self._shapes), WeightedMean()
        for reply in self._valid(replies):
            try:
                weight, metric_vals, array_vals = self._unpack(reply.content, with_arrays=True)
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
        metrics = WeightedMean()
        for reply in self._valid(replies):
            try:
                weight, metric_vals, _ = self._unpack(reply.content, with_arrays=False)
                metrics.add(metric_vals, weight)
            except InvalidReplyError as exc:
                skip_reply(reply, str(exc))
        return to_metric_record(metrics.mean()) if metrics.count else None

    def _unpack(
        self, content: RecordDict, *, with_arrays: bool
    ) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Split a reply into (weight, metrics, arrays), checking its structure."""
        metric_records = records_of(content, MetricRecord)
        if len(metric_records) != 1:
            raise InvalidReplyError(f"expected one MetricRecord, got {len(metric_records)}")
        metric_record = next(iter(metric_records.values()))
        if self.weighted_by_key not in metric_record:
            raise InvalidReplyError(f"MetricRecord lacks the weight {self.weighted_by_key!r}")
        weight = metric_record[self.weighted_by_key]
        if isinstance(weight, list):
            raise InvalidReplyError(f"weight {self.weighted_by_key!r} must be a number")
        array_vals: dict[str, np.ndarray] = {}
        if with_arrays:
            array_records = records_of(content, ArrayRecord)
            if len(array_records) != 1:
                raise InvalidReplyError(f"expected one ArrayRecord, got {len(array_records)}")
            array_vals = arrays_of(next(iter(array_records.values())))
        return weight, metric_values(metric_record, exclude=self.weighted_by_key), array_vals

    def _valid(self, replies: Iterable[Message]) -> Iterable[Message]:
        """Yield replies that carry content; log and skip error replies."""
        for reply in replies:
            if reply.has_error():
                skip_reply(reply, reply.error.reason or f"error code {reply.error.code}")
            else:
                yield reply


def skip_reply(reply: Message, reason: str) -> None:
    """Log why a reply does not count; strategies skip it and go on."""
    logger.warning("Skipping reply from node %d: %s", reply.metadata.src_node_id, reason)
