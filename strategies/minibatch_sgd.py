"""Minibatch SGD, the non-local baseline of Murata & Suzuki (ICML 2021).

Every worker returns the gradient of its loss on a fresh minibatch of B samples
at the global point; the server steps x <- x - η mean_p g_p. One exchange per
round, d floats each way per worker.
"""

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
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
    reply_with,
)
from fedsim.clients.trainer import trainer_for
from fedsim.loop import TrainRound
from fedsim.records import config_number
from fedsim.strategies.aggregation import dtypes_of
from fedsim.strategies.multi_exchange import (
    GradientStrategy,
    refusals,
    shapes_and_vector,
    step,
)


def gradient(client: TorchClient, message: Message, context: Context) -> Message:
    """Client action ``train.gradient``: reply g(x; I) at the message's point x."""
    point, data = point_of(client, message), local_data(client, context)
    trainer = trainer_for(client.task, message, context)
    batch_size = config_number(config_of(message), keys.BATCH_SIZE, int)
    batch = trainer.batch(data, batch_size, batch_generator(message, context))
    value, loss = trainer.gradient(model_for(client, point), client.task.loss_fn, point, batch)
    return reply_with(message, {keys.ARRAYS: value}, loss, len(data), trainer.spend(context))


class MinibatchSGD(GradientStrategy):
    """Minibatch SGD; ``batch_size`` is B, ``lr`` the server's step size η."""

    client_actions = (ClientAction(keys.TRAIN_GRADIENT, gradient),)
    privacy_refusals = refusals("minibatch SGD", "train.gradient")

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
        means, metrics, counted = self.mean_of_replies(
            replies, shapes, keys.ARRAYS, dtypes=dtypes_of(arrays)
        )
        if not counted:
            return None, None
        return to_array_record(step(point, means[0], self.lr)), metrics
