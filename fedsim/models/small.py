"""Small models for tests, benchmarks and CPU runs: ``cnn``, ``mlp``, ``logreg``.

``cnn`` on 1x28x28 inputs has 105,866 parameters, the size of the engine
benchmark's workload.
"""

from math import prod

from torch import nn


def cnn(input_shape: tuple[int, ...], num_classes: int, *, hidden: int = 64) -> nn.Module:
    """Two 3x3 conv blocks (16, 32 channels; each halves the resolution), then two linears."""
    channels, height, width = image_shape("cnn", input_shape, smallest=4)
    flat = 32 * (height // 4) * (width // 4)
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )  # fmt: skip


def mlp(input_shape: tuple[int, ...], num_classes: int, *, hidden: int = 64) -> nn.Module:
    """One hidden ReLU layer over the flattened input."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def logreg(input_shape: tuple[int, ...], num_classes: int, *, hidden: int = 64) -> nn.Module:
    """Multinomial logistic regression (``hidden`` is unused), the FedProx synthetic model."""
    del hidden
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), num_classes))


def image_shape(model: str, input_shape: tuple[int, ...], *, smallest: int) -> tuple[int, int, int]:
    """Return ``(channels, height, width)``, or say in one line why ``model`` cannot take it."""
    if len(input_shape) != 3 or min(input_shape[1:]) < smallest:
        raise ValueError(
            f"model {model!r} needs image inputs (channels, height>={smallest}, "
            f"width>={smallest}), got {input_shape}; use 'mlp' or 'logreg' for vector data"
        )
    return input_shape[0], input_shape[1], input_shape[2]
