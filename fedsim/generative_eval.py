"""How fedsim measures a class-conditional generator's samples.

GS-WGAN (Chen, Orekondy & Fritz, "GS-WGAN: A Gradient-Sanitized Approach for Learning
Differentially Private Generators", NeurIPS 2020, arXiv:2006.08265) reports two kinds of
number for its generators, and fedsim computes both, plus the ceiling that gives the first
its meaning:

* **Downstream accuracy.** Train a classifier on generated, labelled samples only and test
  it on the real test split. It asks whether the samples carry what a classifier needs
  about each class: a generator that ignores its label, collapses to a few modes or draws
  blurs scores low even when single images look plausible. The paper trains its
  downstream classifiers with SGD (lr 0.02, momentum 0.9, weight decay 1e-4, batch 128,
  50 epochs); :func:`train_classifier` uses those defaults and lets the caller choose the
  epochs.
* **Real accuracy.** The same classifier trained on the real train split. It is the
  ceiling of downstream accuracy for this classifier and budget, so a downstream number
  reads as a fraction of what real data would give.
* **Fréchet distance in a classifier's feature space.** Fit a Gaussian to the features of
  the generated samples and one to the features of the real test split, and report the
  Fréchet (2-Wasserstein) distance between the two Gaussians (Heusel et al., "GANs
  Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS
  2017). It compares whole distributions, so it sees a loss of diversity that accuracy
  can miss. **This is not Inception FID.** The features are the penultimate layer of
  :func:`fedsim.models.cnn` trained on the real data (the reference classifier), not
  Inception-v3's pool features: fedsim runs offline on 8x8 and 28x28 grey-scale images
  that Inception was never trained on, and ships no Inception weights. The number is
  comparable across runs that share a dataset and a reference classifier (same seed and
  epochs), never with published FIDs.

:func:`save_sample_grid` draws the samples themselves, a row per class, because none of
these numbers replaces looking at them.

Everything runs on the CPU. Randomness (initialization, shuffles) comes from a seed through
:mod:`fedsim.seeding`; torch's global generator is left as it was.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, MetricRecord
from torch import Tensor, nn

from fedsim.models import cnn
from fedsim.seeding import SERVER_NODE, derive_seed, seeded_torch_rng, torch_generator

# The reference implementation's (TTUR / pytorch-fid ``calculate_frechet_distance``)
# regularizer for a singular covariance product, and its bound on the imaginary part of
# the square root's diagonal below which it is rounding error.
SINGULAR_EPS = 1e-6
IMAGINARY_ATOL = 1e-3
_CPU = torch.device("cpu")


def train_classifier(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    epochs: int,
    seed: int,
    lr: float = 0.02,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
) -> nn.Module:
    """Train :func:`fedsim.models.cnn` on ``(x, y)`` with SGD, the paper's downstream setup.

    Parameters
    ----------
    x : Tensor
        Images, ``(n, channels, height, width)``.
    y : Tensor
        Labels in ``[0, num_classes)``, ``(n,)``.
    num_classes : int
        Size of the label space.
    epochs : int
        Passes over the data (the paper uses 50).
    seed : int
        Root of the initialization and of each epoch's shuffle.
    lr, momentum, weight_decay, batch_size
        SGD's settings; the defaults are the paper's. The last batch of an epoch may be
        smaller.

    Returns
    -------
    nn.Module
        The trained classifier, in eval mode, on the CPU.
    """
    x, y = _labelled(x, y, num_classes)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    with seeded_torch_rng(derive_seed(seed, 0, SERVER_NODE, "eval-classifier.init"), _CPU):
        model = cnn(tuple(x.shape[1:]), num_classes)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    model.train()
    for epoch in range(epochs):
        shuffle = torch_generator(seed, epoch, SERVER_NODE, "eval-classifier.shuffle")
        order = torch.randperm(len(x), generator=shuffle)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1024) -> float:
    """Return the fraction of ``x`` whose arg-max logit under ``model`` equals ``y``."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"accuracy needs as many labels as inputs (>= 1), got {len(x)}, {len(y)}")
    correct = 0
    with torch.inference_mode():
        for xs, ys in zip(x.split(batch_size), y.split(batch_size), strict=True):
            correct += int((model(xs.float()).argmax(dim=1) == ys).sum())
    return correct / len(x)


def features(model: nn.Module, x: Tensor, *, batch_size: int = 1024) -> np.ndarray:
    """Return the penultimate-layer activations of a :func:`fedsim.models.cnn`.

    Parameters
    ----------
    model : nn.Module
        An ``nn.Sequential`` ending in an ``nn.Linear`` (the logits), such as
        :func:`fedsim.models.cnn`; every layer but that one is applied.
    x : Tensor
        Inputs, ``(n, *input_shape)``.
    batch_size : int
        Inputs per forward pass.

    Returns
    -------
    np.ndarray
        float64, ``(n, d)``: for ``cnn``, ``d`` is its ``hidden`` width (after the ReLU).
    """
    if not (isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear)):
        raise TypeError(f"features needs an nn.Sequential ending in nn.Linear, got {type(model)}")
    body = model[:-1]
    with torch.inference_mode():
        parts = [body(xs.float()).flatten(1) for xs in x.split(batch_size)]
    return torch.cat(parts).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Return the Fréchet distance between Gaussians fitted to two sets of features.

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, with sample means and
    unbiased covariances, as the reference FID implementation computes it. The square root
    is :func:`scipy.linalg.sqrtm`'s; its imaginary part, rounding error for a product of
    two covariances, is dropped. If the product is singular (fewer samples than features,
    or a feature that never varies, such as a dead ReLU), :data:`SINGULAR_EPS` is added to
    both covariances' diagonals as the reference does, but in the trace terms too, so that
    a set's distance to itself stays 0 rather than ``-2 d eps``.

    Parameters
    ----------
    a, b : np.ndarray
        Features, ``(n_a, d)`` and ``(n_b, d)``, each with at least 2 rows.

    Returns
    -------
    float
        The distance (a squared distance: translating ``b`` by ``v`` adds ``||v||^2``).

    Raises
    ------
    ValueError
        If the shapes differ in ``d`` or have fewer than 2 rows, a feature is not finite,
        or the root's diagonal has an imaginary part above :data:`IMAGINARY_ATOL` (the
        reference's test for a root that is not rounding error).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(
            f"frechet_distance needs two (n, d) arrays with equal d and n >= 2, "
            f"got shapes {a.shape} and {b.shape}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("frechet_distance got non-finite features")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root, singular = _sqrtm(cov_a @ cov_b)
    if singular:
        offset = SINGULAR_EPS * np.eye(len(cov_a))
        cov_a, cov_b = cov_a + offset, cov_b + offset
        root, _ = _sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():
            raise ValueError("frechet_distance: no finite square root even after regularizing")
    diagonal_imag = np.abs(np.diagonal(root).imag).max(initial=0.0)
    if diagonal_imag > IMAGINARY_ATOL:
        raise ValueError(f"frechet_distance: square root has imaginary part {diagonal_imag:.3g}")
    diff = mean_a - mean_b
    trace = np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root.real)
    return float(diff @ diff + trace)


def _sqrtm(product: np.ndarray) -> tuple[np.ndarray, bool]:
    """Return ``sqrtm(product)`` and whether it is unreliable (singular or non-finite)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(product)
    flagged = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    return root, flagged or not np.isfinite(root).all()


def save_sample_grid(
    images: Tensor,
    labels: Tensor,
    path: str | Path,
    *,
    per_class: int = 10,
    title: str = "",
) -> Path:
    """Save a PNG of samples: a row per class, in ascending label order.

    Each row holds the first ``per_class`` images of its class (blank cells if it has
    fewer). Each image pixel is drawn as a square of ``max(1, 64 // max(h, w))`` screen
    pixels, cells are separated by one image pixel of white, and a title band of 32 screen
    pixels is added on top when ``title`` is set, so the PNG's size is known in advance.

    Parameters
    ----------
    images : Tensor
        Grey-scale images in [0, 1] (values outside are clipped), ``(n, 1, h, w)`` or
        ``(n, h, w)``.
    labels : Tensor
        Class of each image, ``(n,)``.
    path : str or Path
        Where to write the PNG; missing parent folders are created.
    per_class : int
        Images per row.
    title : str
        Text above the grid.

    Returns
    -------
    Path
        ``path``.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    pixels = images.detach().cpu().float()
    if pixels.ndim == 4 and pixels.shape[1] == 1:
        pixels = pixels[:, 0]
    if pixels.ndim != 3 or len(pixels) != len(labels) or len(pixels) == 0 or per_class < 1:
        raise ValueError(
            f"save_sample_grid needs grey-scale images (n, 1, h, w) with n labels and "
            f"per_class >= 1, got {tuple(images.shape)}, {tuple(labels.shape)}, {per_class}"
        )
    mosaic = _mosaic(pixels.clamp(0, 1).numpy(), labels.cpu().numpy(), per_class)
    scale = max(1, 64 // max(pixels.shape[1:]))
    band = 32 if title else 0
    dpi = 100
    height, width = mosaic.shape[0] * scale + band, mosaic.shape[1] * scale
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0 - band / height))
    axes.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    axes.set_axis_off()
    if title:
        figure.text(0.5, 1.0 - band / 2 / height, title, ha="center", va="center", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi)
    return path


def _mosaic(pixels: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """Tile ``(n, h, w)`` images into rows by label, with white one-pixel gutters."""
    classes = np.unique(labels)
    h, w = pixels.shape[1:]
    mosaic = np.ones((len(classes) * (h + 1) + 1, per_class * (w + 1) + 1))
    for row, label in enumerate(classes):
        for col, image in enumerate(pixels[labels == label][:per_class]):
            top, left = 1 + row * (h + 1), 1 + col * (w + 1)
            mosaic[top : top + h, left : left + w] = image
    return mosaic


@dataclass(frozen=True)
class SampleQuality:
    """What :func:`sample_quality` measured.

    Attributes
    ----------
    downstream_accuracy : float
        Real-test accuracy of a classifier trained on the generated samples.
    real_accuracy : float
        Real-test accuracy of the reference classifier, trained on the real train split
        with the same settings: the ceiling of ``downstream_accuracy``.
    frechet_distance : float
        Fréchet distance between generated samples and the real test split in the
        reference classifier's penultimate features (not Inception FID).
    """

    downstream_accuracy: float
    real_accuracy: float
    frechet_distance: float


def sample_quality(
    fake_x: Tensor,
    fake_y: Tensor,
    real_train_x: Tensor,
    real_train_y: Tensor,
    real_test_x: Tensor,
    real_test_y: Tensor,
    num_classes: int,
    *,
    epochs: int,
    seed: int,
    reference: nn.Module | None = None,
) -> tuple[SampleQuality, nn.Module]:
    """Measure generated samples against real data (see the module docstring).

    Parameters
    ----------
    fake_x, fake_y : Tensor
        Generated images and the labels they were generated for.
    real_train_x, real_train_y : Tensor
        Real train split, on which the reference classifier is trained.
    real_test_x, real_test_y : Tensor
        Real test split: both classifiers are tested on it, and the generated samples'
        features are compared with its features.
    num_classes : int
        Size of the label space.
    epochs, seed : int
        :func:`train_classifier`'s, for both classifiers.
    reference : nn.Module or None
        A reference classifier returned by an earlier call on the same real data; if
        given, the real train split is not used and nothing is retrained for it.

    Returns
    -------
    tuple[SampleQuality, nn.Module]
        The measures, and the reference classifier, to pass to the next call.
    """
    if tuple(fake_x.shape[1:]) != tuple(real_test_x.shape[1:]):
        raise ValueError(
            f"generated images {tuple(fake_x.shape[1:])} and real ones "
            f"{tuple(real_test_x.shape[1:])} differ in shape"
        )
    downstream = train_classifier(fake_x, fake_y, num_classes, epochs=epochs, seed=seed)
    if reference is None:
        reference = train_classifier(
            real_train_x, real_train_y, num_classes, epochs=epochs, seed=seed
        )
    quality = SampleQuality(
        downstream_accuracy=accuracy(downstream, real_test_x, real_test_y),
        real_accuracy=accuracy(reference, real_test_x, real_test_y),
        frechet_distance=frechet_distance(
            features(reference, fake_x), features(reference, real_test_x)
        ),
    )
    return quality, reference


def frechet_evaluator(
    sample: Callable[[ArrayRecord, Tensor], Tensor],
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    *,
    samples_per_class: int,
    epochs: int,
    seed: int,
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Return a central evaluator: the Fréchet distance of a generator's samples to the test split.

    ``sample(arrays, labels)`` generates one image per label from the run's arrays;
    ``samples_per_class`` of each class are compared, in the features of a classifier
    trained on ``(test_x, test_y)`` once, on first use, for ``epochs``.
    """
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
    reference: dict[str, Any] = {}  # the classifier and the test split's features, once

    def evaluate_fn(_round: int, arrays: ArrayRecord) -> MetricRecord:
        if not reference:
            classifier = train_classifier(test_x, test_y, num_classes, epochs=epochs, seed=seed)
            reference.update(classifier=classifier, test=features(classifier, test_x))
        generated = features(reference["classifier"], sample(arrays, labels))
        return MetricRecord({"frechet_distance": frechet_distance(generated, reference["test"])})

    return evaluate_fn


def _labelled(x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Return ``(x, y)`` as CPU float32 and int64 after checking they match."""
    if len(x) == 0 or len(x) != len(y) or y.ndim != 1:
        raise ValueError(
            f"need n >= 1 inputs with n labels, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    y = y.cpu().long()
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{low}, {high}]")
    return x.cpu().float(), y
