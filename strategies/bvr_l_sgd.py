"""BVR-L-SGD: Bias-Variance Reduced Local SGD (Murata & Suzuki, ICML 2021, arXiv 2102.03198).

Algorithms 2 and 3 of the paper (spec: ``shared/specs/bvr-l-sgd.md``). Each stage
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

Communication (the cheaper protocol of the spec): the server draws p̂ before the
local exchange and asks only that worker, so per round the downlink is P·d (the
point, to every worker) + 2d (point and estimate, to p̂) and the uplink P·d
(differences) + d (p̂'s model); workers remember their previous point in
``Context.state`` instead of receiving it again.

What we report as the model is the last iterate x̃_S (the practice the spec
allows), not the theory's randomly drawn x̃^out, and the LocalRoutine returns
its last point, not a random inner iterate.
"""

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from fedsim import keys
from fedsim.arrays import to_array_record
from fedsim.loop import TrainRound
from fedsim.strategies.aggregation import shapes_of
from fedsim.strategies.sarah import SARAH


class BVRLSGD(SARAH):
    """BVR-L-SGD on the parameters of :class:`~fedsim.strategies.sarah.SARAH`.

    ``batch_size`` is b and ``local_steps`` K; the estimate minibatch has K·b
    samples, as in the paper.
    """

    @property
    def estimate_batch_size(self) -> int:
        """Samples per worker of a round's recursion step: K·b."""
        return self.local_steps * self.batch_size

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Refresh the estimate, then let one uniformly picked worker run the LocalRoutine."""
        metrics, counted = yield from self.refresh_estimate(server_round, arrays, config, grid)
        if not counted or self.estimate is None:
            return None, None
        picked = self.pick(server_round, sorted(counted))
        replies = yield self.send(
            server_round,
            [picked],
            keys.TRAIN_LOCAL,
            self.exchange_config(config),
            **{keys.ARRAYS: arrays, keys.ESTIMATE: to_array_record(self.estimate)},
        )
        models, _, _ = self.mean_of_replies(replies, shapes_of(arrays), keys.ARRAYS)
        return (to_array_record(models[0]) if models else None), _with_pick(metrics, picked)


def _with_pick(metrics: MetricRecord | None, picked: int) -> MetricRecord:
    """Return the workers' mean loss at the round's starting point, and the picked node."""
    return MetricRecord({**(metrics or {}), "picked-node": picked})
