"""SCAFFOLD (Karimireddy et al., ICML 2020, option II), a local baseline of Murata & Suzuki.

Server state: the point x and the control variate c (zero at the start). Each
worker keeps its own c_p in ``Context.state`` (zero on first contact), runs K
corrected local steps y <- y - η_l (g(y; I_k) - c_p + c), and returns
Δy = y - x and Δc = c_p+ - c_p with c_p+ = c_p - c + (x - y) / (K η_l). The server
steps x <- x + η_g mean Δy and c <- c + (|S| / N) mean Δc, |S| the workers that
replied and N the population. 2d each way per worker.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid
from torch import Tensor, nn

from fedsim import keys
from fedsim.algorithm import ClientAction
from fedsim.arrays import to_array_record
from fedsim.clients import TorchClient
from fedsim.clients.cohort import SGD, train_stacked
from fedsim.clients.local_routines import LocalData, Point, mean_loss, plain_trainer
from fedsim.clients.points import (
    batch_generator,
    cohort_workers,
    config_of,
    local_data,
    model_for,
    point_of,
    reply_with,
    tensors,
    to_record,
)
from fedsim.clients.trainer import Trainer, trainer_for
from fedsim.clients.training import LossFn
from fedsim.loop import TrainRound
from fedsim.records import config_number, get_record, records_of
from fedsim.strategies.aggregation import dtypes_of
from fedsim.strategies.multi_exchange import (
    GradientStrategy,
    Vector,
    refusals,
    shapes_and_vector,
    step,
)
from fedsim.strategies.sampling import available_nodes


def scaffold_steps(
    model: nn.Module,
    loss_fn: LossFn,
    start: Mapping[str, Tensor],
    data: LocalData,
    *,
    lr: float,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    trainer: Trainer | None = None,
    server_control: Mapping[str, Tensor],
    client_control: Mapping[str, Tensor],
) -> tuple[Point, Point, Point, float]:
    """SCAFFOLD's client (Karimireddy et al., ICML 2020, option II).

    y <- y - lr (g(y; I_k) - c_p + c) for ``steps`` steps from x; then
    c_p+ = c_p - c + (x - y) / (steps lr). Returns (Δy = y - x, Δc = c_p+ - c_p,
    c_p+, mean loss). Gradients and batches come from ``trainer`` (plain or DP-SGD).
    """
    trainer = trainer or plain_trainer()
    point = {name: value.detach() for name, value in start.items()}
    correction = {name: server_control[name] - client_control[name] for name in point}
    losses = []
    for _ in range(steps):
        batch = trainer.batch(data, batch_size, generator)
        gradient, loss = trainer.gradient(model, loss_fn, point, batch)
        losses.append(loss)
        point = {name: point[name] - lr * (gradient[name] + correction[name]) for name in point}
    return (*_changes(start, point, server_control, client_control, lr * steps), mean_loss(losses))


def _changes(
    start: Mapping[str, Tensor],
    end: Mapping[str, Tensor],
    server_control: Mapping[str, Tensor],
    client_control: Mapping[str, Tensor],
    distance: float,
) -> tuple[Point, Point, Point]:
    """Return Δy = y - x, Δc = c_p+ - c_p and c_p+ = c_p - c + (x - y) / (K η_l)."""
    delta = {name: end[name] - start[name] for name in end}
    new_control = {
        name: client_control[name] - server_control[name] - delta[name] / distance for name in end
    }
    control_delta = {name: new_control[name] - client_control[name] for name in end}
    return delta, control_delta, new_control


def scaffold(client: TorchClient, message: Message, context: Context) -> Message:
    """Client action ``train.scaffold``: reply Δy and Δc; keep c_p in ``Context.state``."""
    config, point = config_of(message), point_of(client, message)
    server_control = tensors(client, get_record(message.content, keys.CONTROL, ArrayRecord))
    client_control = _client_control(client, context, point)
    data, trainer = local_data(client, context), trainer_for(client.task, message, context)
    delta, control_delta, new_control, loss = scaffold_steps(
        model_for(client, point),
        client.task.loss_fn,
        point,
        data,
        lr=config_number(config, keys.LR, float),
        steps=config_number(config, keys.LOCAL_STEPS, int),
        batch_size=config_number(config, keys.BATCH_SIZE, int),
        generator=batch_generator(message, context),
        trainer=trainer,
        server_control=server_control,
        client_control=client_control,
    )
    context.state[keys.CLIENT_CONTROL] = to_record(new_control)
    vectors = {keys.ARRAYS: delta, keys.CONTROL: control_delta}
    return reply_with(message, vectors, loss, len(data), trainer.spend(context))


def scaffold_cohort(
    client: TorchClient, messages: Sequence[Message], contexts: Sequence[Context]
) -> list[Message | None]:
    """SCAFFOLD's corrected local steps for a whole cohort as one batched computation.

    Each worker's correction c - c_p is a constant offset on its gradients; batches
    and the control update are :func:`scaffold`'s. Workers without samples are left
    to :func:`scaffold` (its error reply).
    """
    config, point = config_of(messages[0]), point_of(client, messages[0])
    server_control = tensors(client, get_record(messages[0].content, keys.CONTROL, ArrayRecord))
    lr = config_number(config, keys.LR, float)
    steps = config_number(config, keys.LOCAL_STEPS, int)
    size = config_number(config, keys.BATCH_SIZE, int)
    workers = cohort_workers(client, messages, contexts, steps=steps, batch_size=size)
    controls = [_client_control(client, contexts[index], point) for index, _ in workers]
    corrected = [
        replace(work, offset={name: server_control[name] - control[name] for name in point})
        for (_, work), control in zip(workers, controls, strict=True)
    ]
    results = train_stacked(
        model_for(client, point), corrected, loss_fn=client.task.loss_fn, sgd=SGD(lr),
        start=point, host=True,
    )  # fmt: skip
    # The states come back on the CPU: the control updates are taken there.
    start, server_control = _on_cpu(point), _on_cpu(server_control)
    replies: list[Message | None] = [None] * len(messages)
    kept = {}
    for (index, work), control, result in zip(workers, controls, results, strict=True):
        end = {name: result.state[name] for name in point}
        delta, control_delta, new_control = _changes(
            start, end, server_control, _on_cpu(control), lr * steps
        )
        kept[index] = to_record(new_control)
        vectors = {keys.ARRAYS: delta, keys.CONTROL: control_delta}
        replies[index] = reply_with(messages[index], vectors, result.loss, len(work.targets))
    # Only now, every reply built: a failure above leaves each node's c_p as it was, for the
    # one-at-a-time path the engine then falls back to.
    for index, record in kept.items():
        contexts[index].state[keys.CLIENT_CONTROL] = record
    return replies


def _on_cpu(point: Point) -> Point:
    return {name: value.cpu() for name, value in point.items()}


def _client_control(client: TorchClient, context: Context, point: Point) -> Point:
    """Return the node's c_p from ``Context.state``; zero on first contact."""
    stored = records_of(context.state, ArrayRecord).get(keys.CLIENT_CONTROL)
    if stored is not None:
        return tensors(client, stored)
    return {name: torch.zeros_like(value) for name, value in point.items()}


@dataclass(kw_only=True, eq=False)
class SCAFFOLD(GradientStrategy):
    """SCAFFOLD; ``lr`` is the local η_l, ``server_lr`` the global η_g (1 in the paper's runs)."""

    server_lr: float = 1.0

    client_actions = (ClientAction(keys.TRAIN_SCAFFOLD, scaffold, cohort=scaffold_cohort),)
    privacy_refusals = refusals("SCAFFOLD", "train.scaffold")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
        self.control: Vector | None = None  # the server's c

    def state_dict(self) -> dict[str, Any]:
        """Return the server's control variate, for run checkpoints."""
        return {"control": self.control}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the control variate from :meth:`state_dict`."""
        self.control = state["control"]

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Send x and c; step both with the mean of the workers' changes."""
        shapes, point = shapes_and_vector(arrays)
        control = self.control or {name: value * 0 for name, value in point.items()}
        replies = yield self.send(
            server_round,
            self.workers(server_round, grid),
            keys.TRAIN_SCAFFOLD,
            self.exchange_config(config),
            **{keys.ARRAYS: arrays, keys.CONTROL: to_array_record(control)},
        )
        means, metrics, counted = self.mean_of_replies(
            replies, shapes, keys.ARRAYS, keys.CONTROL, dtypes=dtypes_of(arrays)
        )
        if not counted:
            return None, None
        point_delta, control_delta = means
        share = len(counted) / len(available_nodes(grid, 0))
        self.control = step(control, control_delta, -share)
        return to_array_record(step(point, point_delta, -self.server_lr)), metrics
