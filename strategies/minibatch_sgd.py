"""Minibatch SGD, the non-local baseline of Murata & Suzuki (ICML 2021).

Every worker returns the gradient of its loss on a fresh minibatch of B samples
at the global point; the server steps x <- x - η mean_p g_p. One exchange per
round, d floats each way per worker.
"""

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedsim import keys
from fedsim.arrays import to_array_record
from fedsim.loop import TrainRound
from fedsim.strategies.multi_exchange import GradientStrategy, shapes_and_vector, step


class MinibatchSGD(GradientStrategy):
    """Minibatch SGD; ``batch_size`` is B, ``lr`` the server's step size η."""

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Collect the workers' minibatch gradients and take one step."""
        shapes, point = shapes_and_vector(arrays)
        replies = yield self.send(
            server_round,
            self.workers(server_round, grid),
            keys.TRAIN_GRADIENT,
            self.exchange_config(config),
            **{keys.ARRAYS: arrays},
        )
        means, metrics, counted = self.mean_of_replies(replies, shapes, keys.ARRAYS)
        if not counted:
            return None, None
        return to_array_record(step(point, means[0], self.lr)), metrics
