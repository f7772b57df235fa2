"""The local computations of BVR-L-SGD and its baselines, on named parameter tensors.

Murata & Suzuki (ICML 2021) evaluate gradients of one model at two points on one
minibatch (the SARAH recursion), so these routines take points as explicit
``{name: tensor}`` dicts and call the model functionally
(``torch.func.functional_call``) instead of loading weights into it. Every draw of
a minibatch takes an explicit generator (Murata & Suzuki, ICML 2021, arXiv 2102.03198).
"""

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedsim.clients.training import LossFn

if TYPE_CHECKING:
    from fedsim.clients.trainer import Trainer

Point = dict[str, Tensor]


class LocalData:
    """A node's samples as two tensors, with minibatch draws.

    Parameters
    ----------
    inputs, targets
        All of the node's samples, on the device the model runs on.
    """

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        if len(inputs) != len(targets) or len(inputs) == 0:
            raise ValueError(
                f"need as many inputs as targets, at least one; got {len(inputs)} and "
                f"{len(targets)}"
            )
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Return ``size`` distinct samples drawn uniformly.

        A ``size`` of 0 or at least the data size returns all samples in order: the
        full local gradient (the paper's b̃ >= n case).
        """
        if size <= 0 or size >= len(self):
            return self.inputs, self.targets
        index = torch.randperm(len(self), generator=generator)[:size].to(self.inputs.device)
        return self.inputs[index], self.targets[index]


def batch_gradient(
    model: nn.Module, loss_fn: LossFn, point: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]
) -> tuple[Point, float]:
    """Return g(point; batch), the gradient of the batch-mean loss, and that loss."""
    params = {name: value.detach().requires_grad_() for name, value in point.items()}
    inputs, targets = batch
    loss = loss_fn(functional_call(model, params, (inputs,)), targets)
    grads = torch.autograd.grad(loss, tuple(params.values()))
    return dict(zip(params, grads, strict=True)), loss.item()


def gradient_difference(
    model: nn.Module,
    loss_fn: LossFn,
    point: Mapping[str, Tensor],
    previous: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
) -> tuple[Point, float]:
    """Return g(point; I) - g(previous; I) on ONE minibatch I, and the loss at ``point``.

    Using the same samples at both points is what makes the difference small when
    the points are close (the variance reduction of SARAH).
    """
    now, loss = batch_gradient(model, loss_fn, point, batch)
    before, _ = batch_gradient(model, loss_fn, previous, batch)
    return {name: now[name] - before[name] for name in now}, loss


def local_steps(
    model: nn.Module,
    loss_fn: LossFn,
    start: Mapping[str, Tensor],
    data: LocalData,
    *,
    lr: float,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    trainer: "Trainer | None" = None,
    estimate: Mapping[str, Tensor] | None = None,
) -> tuple[Point, float]:
    """Take ``steps`` local steps from ``start``; return the last point and the mean loss.

    Without ``estimate`` this is plain minibatch SGD (Local SGD's client). With it,
    it is BVR-L-SGD's LocalRoutine: v_0 is the server's estimate and
    v_k = g(x_{k-1}; I_k) - g(x_{k-2}; I_k) + v_{k-1}, x_k = x_{k-1} - lr v_k, with
    x_{-1} = x_0, so the first step is x_1 = x_0 - lr v_0 and draws no batch.
    Gradients and batches come from ``trainer`` (plain or DP-SGD; plain SGD when
    none is given). The mean loss
    is over the steps whose batch had samples (NaN if none had).
    """
    trainer = trainer or plain_trainer()
    point = {name: value.detach() for name, value in start.items()}
    previous = point
    direction = dict(estimate) if estimate is not None else None
    losses: list[float | None] = []
    for step in range(steps):
        if direction is None:
            batch = trainer.batch(data, batch_size, generator)
            update, loss = trainer.gradient(model, loss_fn, point, batch)
            losses.append(loss)
        else:
            update = direction
            if step > 0:
                batch = trainer.batch(data, batch_size, generator)
                difference, loss = trainer.difference(model, loss_fn, point, previous, batch)
                update = {name: difference[name] + direction[name] for name in point}
                losses.append(loss)
            direction = update
        previous, point = point, {name: point[name] - lr * update[name] for name in point}
    return point, mean_loss(losses)


def plain_trainer() -> "Trainer":
    """Return the trainer of plain SGD, for routines called without one."""
    from fedsim.clients.trainer import PlainTrainer  # it builds on this module

    return PlainTrainer(shuffle=torch.Generator())


def mean_loss(losses: list[float | None]) -> float:
    """Return the mean of the losses of non-empty batches (NaN if there is none)."""
    present = [loss for loss in losses if loss is not None]
    return sum(present) / len(present) if present else float("nan")
