"""The FedAvg paper's models (McMahan et al., AISTATS 2017, arXiv 1602.05629, Section 3).

* **2NN** (MNIST): "a simple multilayer-perceptron with 2-hidden layers with 200 units
  each using ReLu activations (199,210 total parameters)".
* **CNN** (MNIST): "two 5x5 convolution layers (the first with 32 channels, the second
  with 64, each followed with 2x2 max pooling), a fully connected layer with 512 units
  and ReLu activation, and a final softmax output layer (1,663,370 total parameters)".
  The parameter count implies unpadded convolutions would not fit (28 -> 24 -> 12 -> 8
  -> 4 gives 1,024 features, 582,026 parameters); padded ('same') ones give 7x7x64 =
  3,136 features and exactly 1,663,370, so the convolutions are padded.
* **CIFAR CNN**: the paper's CIFAR-10 model "was taken from the TensorFlow tutorial":
  two 5x5 convolutions of 64 channels, each followed by 3x3 max pooling with stride 2
  and local response normalization, then fully connected layers of 384 and 192 units
  and a linear layer to the logits. Murata & Suzuki (ICML 2021) train "a CNN" on
  CIFAR-10 for BVR-L-SGD without listing its layers; this is fedsim's stand-in for it,
  chosen because it is the CIFAR model of the FL literature they compare against.

The softmax is left to the loss (``nn.CrossEntropyLoss`` takes logits). None of these
models holds buffers, so every strategy can train them.
"""

from math import prod

from torch import nn

from fedsim.models.small import image_shape


def fedavg_2nn(input_shape: tuple[int, ...], num_classes: int, *, hidden: int = 200) -> nn.Module:
    """Build the 2NN: two hidden ReLU layers of ``hidden`` units (199,210 parameters on MNIST)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(prod(input_shape), hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )  # fmt: skip


def fedavg_cnn(input_shape: tuple[int, ...], num_classes: int, *, hidden: int = 512) -> nn.Module:
    """Build the CNN: 5x5 convs of 32 and 64 channels, 2x2 pooling, ``hidden`` units."""
    channels, height, width = image_shape("fedavg-cnn", input_shape, smallest=4)
    return nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),  # (64, H/4, W/4) -> 64 * (H/4) * (W/4)
        nn.Linear(64 * (height // 4) * (width // 4), hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )  # fmt: skip


def cifar_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the FedAvg paper's TensorFlow-tutorial CIFAR-10 CNN (1.76 million parameters)."""
    channels, height, width = image_shape("cifar-cnn", input_shape, smallest=8)
    side = (_pooled(_pooled(height)), _pooled(_pooled(width)))
    return nn.Sequential(
        nn.Conv2d(channels, 64, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1), nn.LocalResponseNorm(4, alpha=0.001 / 9, beta=0.75),
        nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(),
        nn.LocalResponseNorm(4, alpha=0.001 / 9, beta=0.75), nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(),  # (64, 8, 8) for 32x32 inputs
        nn.Linear(64 * side[0] * side[1], 384), nn.ReLU(),
        nn.Linear(384, 192), nn.ReLU(),
        nn.Linear(192, num_classes),
    )  # fmt: skip


def _pooled(side: int) -> int:
    """Output side of a 3x3, stride-2 max pool padded by 1 (TensorFlow's 'SAME')."""
    return (side - 1) // 2 + 1
