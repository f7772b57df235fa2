"""Local SGD (a.k.a. FedAvg with a fixed number of steps), as Murata & Suzuki compare it.

Every worker takes K SGD steps with minibatches of b samples from the global
point; the server averages the workers' last points (unweighted: the objective
is the mean of the workers' losses). One exchange per round, d each way.
"""

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedsim import keys
from fedsim.arrays import to_array_record
from fedsim.loop import TrainRound
from fedsim.strategies.aggregation import shapes_of
from fedsim.strategies.multi_exchange import GradientStrategy


class LocalSGD(GradientStrategy):
    """Local SGD; ``local_steps`` is K, ``batch_size`` b, ``lr`` the local step size η."""

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Let every worker run K local steps; average their points."""
        replies = yield self.send(
            server_round,
            self.workers(server_round, grid),
            keys.TRAIN_LOCAL,
            self.exchange_config(config),
            **{keys.ARRAYS: arrays},
        )
        means, metrics, counted = self.mean_of_replies(replies, shapes_of(arrays), keys.ARRAYS)
        if not counted:
            return None, None
        return to_array_record(means[0]), metrics
