"""BVR-L-SGD: Bias-Variance Reduced Local SGD (Murata & Suzuki, ICML 2021, arXiv 2102.03198).

Algorithms 2 and 3 of the paper. Each stage
of ``stage_rounds`` rounds starts from its anchor x̃ with a large-batch gradient
estimate ṽ_0; each round then

1. (estimate exchange, every worker) refreshes the estimate with the SARAH
   recursion on one minibatch of K·b samples evaluated at BOTH the current and
   the previous global point: ṽ_t = ṽ_{t-1} + mean_p [g(x_{t-1}; I_p) - g(x_{t-2}; I_p)];
2. (local exchange, ONE worker) draws p̂ uniformly and lets only that worker run
   the LocalRoutine (K steps with the same recursion, starting from ṽ_t); its last
   point is the next global model. It is a random pick, not an average.

Round 1 of a stage has the anchor exchange instead of the estimate exchange:
there x_{-1} = x_0, so the recursion's difference vanishes and ṽ_1 = ṽ_0.

Communication (the cheaper of two protocols that give the same iterates): the
server draws p̂ before the local exchange and asks only that worker, so per round
the downlink is P·d (the point, to every worker) + 2d (point and estimate, to p̂)
and the uplink P·d (differences) + d (p̂'s model); workers remember their
previous point in ``Context.state`` instead of receiving it again.

What we report as the model is the last iterate x̃_S (common practice), not the
theory's randomly drawn x̃^out, and the LocalRoutine returns its last point, not
a random inner iterate.
"""

from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from fedsim import keys
from fedsim.algorithm import ClientAction
from fedsim.arrays import to_array_record
from fedsim.loop import TrainRound
from fedsim.strategies.aggregation import dtypes_of, shapes_of
from fedsim.strategies.local_sgd import local
from fedsim.strategies.multi_exchange import GradientStrategy, Vector, refusals
from fedsim.strategies.sarah import SARAH, SarahEstimate


@dataclass(kw_only=True, eq=False)
class BVRLSGD(GradientStrategy):
    """BVR-L-SGD on the parameters of :class:`GradientStrategy`, plus SARAH's stage settings.

    ``batch_size`` is b and ``local_steps`` K; the estimate minibatch has K·b
    samples, as in the paper.

    Parameters
    ----------
    stage_rounds
        T, rounds per stage; each stage starts with an anchor exchange.
    reference_batch_size
        b̃, samples of each worker's anchor gradient; 0 takes its full local data.
    """

    stage_rounds: int
    reference_batch_size: int = 0

    # SARAH's anchor and estimate exchanges, and the LocalRoutine: Local SGD's handler,
    # which runs the SARAH-corrected steps when the message carries an estimate. Those
    # steps take gradients at two points per step: no cohort form batches them.
    client_actions = (*SARAH.client_actions, ClientAction(keys.TRAIN_LOCAL, local))
    privacy_refusals = refusals("BVR-L-SGD", "train.anchor, train.estimate, train.local")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sarah = SarahEstimate(self.stage_rounds, self.reference_batch_size)

    @property
    def estimate(self) -> Vector | None:
        """The server's estimate ṽ after the last round."""
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
        """Refresh the estimate, then let one uniformly picked worker run the LocalRoutine."""
        metrics, counted = yield from self.sarah.refresh(
            self, server_round, arrays, config, grid, batch_size=self.local_steps * self.batch_size
        )
        if not counted or self.sarah.value is None:
            return None, None
        picked = self.pick(server_round, sorted(counted))
        replies = yield self.send(
            server_round,
            [picked],
            keys.TRAIN_LOCAL,
            self.exchange_config(config),
            **{keys.ARRAYS: arrays, keys.ESTIMATE: to_array_record(self.sarah.value)},
        )
        models, _, _ = self.mean_of_replies(
            replies, shapes_of(arrays), keys.ARRAYS, dtypes=dtypes_of(arrays)
        )
        return (to_array_record(models[0]) if models else None), _with_pick(metrics, picked)


def _with_pick(metrics: MetricRecord | None, picked: int) -> MetricRecord:
    """Return the workers' mean loss at the round's starting point, and the picked node."""
    return MetricRecord({**(metrics or {}), "picked-node": picked})
