"""Local training and evaluation loops for any ``torch.nn.Module``."""

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

LossFn = Callable[[Tensor, Tensor], Tensor]


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
        for index in order.split(batch_size):
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


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, *, loss_fn: LossFn, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Return the example-weighted ``loss`` and, for class labels, ``accuracy``.

    ``loss_fn`` must average over the batch (PyTorch's default reduction).
    Accuracy is reported when targets are integer labels and outputs are
    per-class scores; for other tasks only the loss is meaningful.
    """
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    classification = True
    for inputs, targets in ordered_batches(dataset, batch_size=batch_size):
        outputs = model(inputs.to(device))
        targets = targets.to(device)
        loss_sum += loss_fn(outputs, targets).item() * len(targets)
        classification &= outputs.dim() == 2 and not targets.is_floating_point()
        if classification:
            correct += int((outputs.argmax(dim=1) == targets).sum())
        count += len(targets)
    if count == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    metrics = {"loss": loss_sum / count}
    if classification:
        metrics["accuracy"] = correct / count
    return metrics
