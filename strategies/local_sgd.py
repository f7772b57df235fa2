"""Local SGD (a.k.a. FedAvg with a fixed number of steps), as Murata & Suzuki compare it.

Every worker takes K SGD steps with minibatches of b samples from the global
point; the server averages the workers' last points (unweighted: the objective
is the mean of the workers' losses). One exchange per round, d each way.
"""

from collections.abc import Sequence

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid

from fedsim import keys
from fedsim.algorithm import ClientAction
from fedsim.arrays import to_array_record
from fedsim.clients import TorchClient
from fedsim.clients.cohort import SGD, train_stacked
from fedsim.clients.local_routines import local_steps
from fedsim.clients.points import (
    batch_generator,
    cohort_workers,
    config_of,
    local_data,
    model_for,
    point_of,
    reply_with,
    tensors,
)
from fedsim.clients.trainer import trainer_for
from fedsim.loop import TrainRound
from fedsim.records import config_number, records_of
from fedsim.strategies.aggregation import dtypes_of, shapes_of
from fedsim.strategies.multi_exchange import GradientStrategy, refusals


def local(client: TorchClient, message: Message, context: Context) -> Message:
    """Client action ``train.local``: K local steps from the message's point; reply the last.

    With an ``estimate`` record the steps are BVR-L-SGD's LocalRoutine (the
    SARAH-corrected local steps, ``local_steps``); without, they are Local SGD's.
    """
    config, point = config_of(message), point_of(client, message)
    estimate = records_of(message.content, ArrayRecord).get(keys.ESTIMATE)
    data, trainer = local_data(client, context), trainer_for(client.task, message, context)
    last, loss = local_steps(
        model_for(client, point),
        client.task.loss_fn,
        point,
        data,
        lr=config_number(config, keys.LR, float),
        steps=config_number(config, keys.LOCAL_STEPS, int),
        batch_size=config_number(config, keys.BATCH_SIZE, int),
        generator=batch_generator(message, context),
        trainer=trainer,
        estimate=None if estimate is None else tensors(client, estimate),
    )
    return reply_with(message, {keys.ARRAYS: last}, loss, len(data), trainer.spend(context))


def local_cohort(
    client: TorchClient, messages: Sequence[Message], contexts: Sequence[Context]
) -> list[Message | None]:
    """Local SGD's K steps for a whole cohort as one batched computation.

    Each worker draws its batches from its own generator, as :func:`local` does
    (``draw_schedule`` replays ``LocalData.batch``). BVR-L-SGD's LocalRoutine (an
    ``estimate`` record: gradients at two points per step) and workers without
    samples (an error reply) are left to :func:`local`.
    """
    if keys.ESTIMATE in records_of(messages[0].content, ArrayRecord):
        return [None] * len(messages)
    config, point = config_of(messages[0]), point_of(client, messages[0])
    lr = config_number(config, keys.LR, float)
    steps = config_number(config, keys.LOCAL_STEPS, int)
    size = config_number(config, keys.BATCH_SIZE, int)
    workers = cohort_workers(client, messages, contexts, steps=steps, batch_size=size)
    results = train_stacked(
        model_for(client, point),
        [work for _, work in workers],
        loss_fn=client.task.loss_fn,
        sgd=SGD(lr),
        start=point,
        host=True,
    )
    replies: list[Message | None] = [None] * len(messages)
    for (index, work), result in zip(workers, results, strict=True):
        last = {name: result.state[name] for name in point}
        replies[index] = reply_with(
            messages[index], {keys.ARRAYS: last}, result.loss, len(work.targets)
        )
    return replies


class LocalSGD(GradientStrategy):
    """Local SGD; ``local_steps`` is K, ``batch_size`` b, ``lr`` the local step size η."""

    client_actions = (ClientAction(keys.TRAIN_LOCAL, local, cohort=local_cohort),)
    privacy_refusals = refusals("Local SGD", "train.local")

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
        means, metrics, counted = self.mean_of_replies(
            replies, shapes_of(arrays), keys.ARRAYS, dtypes=dtypes_of(arrays)
        )
        if not counted:
            return None, None
        return to_array_record(means[0]), metrics
