"""Local training and evaluation loops for any ``torch.nn.Module``."""

import math
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812 (PyTorch's own convention)
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedsim import keys
from fedsim.data.datasets import Task

LossFn = Callable[[Tensor, Tensor], Tensor]
#: ``(parameters, start) -> Tensor`` added to every batch loss, of the trainable
#: parameters by name and their values when training began: FedProx's
#: (μ/2)‖w - w_0‖² is ``mu / 2 * sum(((params[k] - start[k]) ** 2).sum() for k in start)``.
Penalty = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor]


def penalized(loss_fn: LossFn, model: nn.Module, penalty: Penalty) -> LossFn:
    """Return ``loss_fn`` plus ``penalty`` of ``model``'s trainable parameters and their start."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    start = {name: p.detach().clone() for name, p in params.items()}
    return lambda outputs, targets: loss_fn(outputs, targets) + penalty(params, start)


def shuffled_batches(
    dataset: Dataset, *, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield one epoch of shuffled ``(inputs, targets)`` minibatches.

    Both paths follow one ``randperm`` drawn from ``generator``: a
    ``TensorDataset`` is sliced with it directly (a DataLoader costs more than a
    small model's step), any other dataset goes through a ``DataLoader`` that
    visits the same order, so the two give identical batches.
    """
    order = torch.randperm(len(dataset), generator=generator)  # type: ignore[arg-type]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        inputs, targets = dataset.tensors
        for index in order.split(batch_size) if len(order) else ():  # no samples: no batch
            yield inputs[index], targets[index]
    else:
        yield from DataLoader(dataset, batch_size=batch_size, sampler=order.tolist())


def ordered_batches(dataset: Dataset, *, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(inputs, targets)`` minibatches in dataset order (for evaluation)."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        inputs, targets = dataset.tensors
        yield from zip(inputs.split(batch_size), targets.split(batch_size), strict=True)
    else:
        yield from DataLoader(dataset, batch_size=batch_size)


def train_epochs(
    model: nn.Module,
    dataset: Dataset,
    *,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> float:
    """Train in place for ``epochs`` passes; return the mean minibatch loss."""
    model.train()
    total, steps = torch.zeros((), device=device), 0
    for _ in range(epochs):
        for inputs, targets in shuffled_batches(
            dataset, batch_size=batch_size, generator=generator
        ):
            optimizer.zero_grad()
            loss = loss_fn(model(inputs.to(device)), targets.to(device))
            loss.backward()
            optimizer.step()
            total += loss.detach()  # not .item() per step: that syncs a GPU every batch
            steps += 1
    return total.item() / max(steps, 1)


#: The metrics :func:`evaluate` reports for each task, besides the loss.
TASK_METRICS: Mapping[Task, tuple[str, ...]] = {
    "classification": (keys.ACCURACY,),
    "regression": (keys.MSE,),
    "next-token": (keys.ACCURACY, keys.PERPLEXITY),
}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    loss_fn: LossFn,
    batch_size: int,
    device: torch.device,
    task: Task = "classification",
) -> dict[str, float]:
    """Return the example-weighted ``loss`` and the task's metrics (:data:`TASK_METRICS`).

    ``loss_fn`` must average over the batch (PyTorch's default reduction). The
    metrics do not depend on it: accuracy compares the argmax of per-class scores
    with the labels; ``mse`` is the mean squared error per target coordinate;
    perplexity is ``exp`` of the mean cross-entropy (nats) of the next token.
    """
    model.eval()
    loss_sum, correct, squared_error, cross_entropy, count = 0.0, 0, 0.0, 0.0, 0
    for inputs, targets in ordered_batches(dataset, batch_size=batch_size):
        outputs = model(inputs.to(device))
        targets = targets.to(device)
        loss_sum += loss_fn(outputs, targets).item() * len(targets)
        count += len(targets)
        if task == "regression":
            squared_error += F.mse_loss(outputs, targets, reduction="sum").item() / max(
                targets[0].numel(), 1
            )
            continue
        if outputs.dim() != 2 or targets.is_floating_point():
            raise ValueError(
                f"task {task!r} needs per-class scores (batch, classes) and integer labels, "
                f"got outputs {tuple(outputs.shape)} and {targets.dtype} targets; "
                "for real-valued targets use task 'regression'"
            )
        correct += int((outputs.argmax(dim=1) == targets).sum())
        if task == "next-token":
            cross_entropy += F.cross_entropy(outputs, targets, reduction="sum").item()
    if count == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    metrics = {keys.LOSS: loss_sum / count}
    if task == "regression":
        metrics[keys.MSE] = squared_error / count
    else:
        metrics[keys.ACCURACY] = correct / count
    if task == "next-token":
        metrics[keys.PERPLEXITY] = math.exp(cross_entropy / count)
    return metrics
