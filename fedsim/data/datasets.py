"""Central (unpartitioned) datasets: train and held-out test tensors.

Every loader returns a :class:`CentralDataset` of plain tensors, so partitioners,
clients and the server never touch Hugging Face or scikit-learn objects. Two
loaders work offline (scikit-learn's embedded digits and the FedProx paper's
Synthetic(alpha, beta)); :func:`load_flwr_dataset` reaches the Hugging Face Hub.
"""

import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    import datasets as hf

# scikit-learn and Hugging Face's datasets take about two seconds to import; they are
# imported where a dataset loads, so a process that only receives a built dataset (a
# Ray actor) never pays for them.


class DatasetUnavailableError(RuntimeError):
    """A dataset that has to be downloaded could not be reached."""


#: What a dataset's targets are, which decides the default loss and the metrics:
#: class labels (cross-entropy; accuracy), real vectors (MSE; mse), or the next token
#: of a sequence (cross-entropy; accuracy and perplexity).
Task = Literal["classification", "regression", "next-token"]
TASKS: tuple[Task, ...] = typing.get_args(Task)


@dataclass(frozen=True)
class CentralDataset:
    """Train and held-out test tensors of one dataset, before partitioning.

    Attributes
    ----------
    train_x, test_x : torch.Tensor
        Inputs of shape ``(n, *input_shape)``: float32, or int64 token ids for
        ``"next-token"``.
    train_y, test_y : torch.Tensor
        Targets: int64 labels of shape ``(n,)`` in ``[0, num_classes)`` for
        ``"classification"`` and ``"next-token"``; float32 of shape
        ``(n, num_classes)`` for ``"regression"``.
    num_classes : int
        Size of the model's output: the label space, which may exceed the labels
        actually present (a Synthetic client need not produce every class), or the
        number of regression targets per sample.
    task : str
        One of :data:`TASKS`.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    task: Task = "classification"

    def __post_init__(self) -> None:
        # Checked once here so that models and partitioners can trust shapes and dtypes.
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        inputs = (torch.float32, torch.int64) if self.task == "next-token" else (torch.float32,)
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if x.dtype not in inputs:
                raise ValueError(f"{split}_x must be {' or '.join(map(str, inputs))}")
            if self.task == "regression":
                if y.dtype != torch.float32 or y.shape[1:] != (self.num_classes,):
                    raise ValueError(
                        f"{split}_y of a regression task must be float32 of shape "
                        f"(n, num_classes={self.num_classes})"
                    )
            elif y.dtype != torch.int64 or y.ndim != 1:
                raise ValueError(f"{split}_y must be int64 labels of shape (n,)")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{split}_x and {split}_y must hold the same number of samples")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError("train_x and test_x must have the same input shape")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, e.g. ``(1, 8, 8)`` for digits."""
        return tuple(self.train_x.shape[1:])


def _check_test_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> CentralDataset:
    """Load scikit-learn's handwritten digits (1797 8x8 images, 10 classes).

    The data ships inside scikit-learn, so this is the dataset for offline runs
    and tests. Pixels (integers 0..16) are divided by 16 into ``[0, 1]``.

    Parameters
    ----------
    test_fraction : float
        Fraction of the samples held out for the test split.
    seed : int
        Seed of the split. The split is stratified, so every class keeps its share
        of the test set even when ``test_fraction`` is small.

    Returns
    -------
    CentralDataset
        Inputs of shape ``(n, 1, 8, 8)``.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    _check_test_fraction(test_fraction)
    bunch = sklearn_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]  # (n, 8, 8) -> (n, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return CentralDataset(
        train_x=torch.from_numpy(train_x),
        train_y=torch.from_numpy(train_y),
        test_x=torch.from_numpy(test_x),
        test_y=torch.from_numpy(test_y),
        num_classes=10,
    )


# Samples per Synthetic client are heavy-tailed; the cap keeps memory bounded.
_MAX_SYNTHETIC_SAMPLES = 1000


def load_synthetic(
    *,
    alpha: float,
    beta: float,
    num_clients: int,
    seed: int = 0,
    dim: int = 60,
    num_classes: int = 10,
    test_fraction: float = 0.2,
) -> tuple[CentralDataset, list[np.ndarray]]:
    """Generate Synthetic(alpha, beta) of FedProx (Li et al., MLSys 2020, Section 5.1).

    Each client ``k`` has its own softmax-regression model and input distribution:
    ``u_k ~ N(0, alpha)`` and ``B_k ~ N(0, beta)`` (variances), ``W_k ~ N(u_k, 1)``
    of shape ``(dim, num_classes)``, ``b_k ~ N(u_k, 1)``, ``v_k ~ N(B_k, 1)``
    per coordinate, ``x ~ N(v_k, Sigma)`` with ``Sigma_jj = j^-1.2``, and
    ``y = argmax(x W_k + b_k)``. ``alpha`` controls how much the local models
    differ and ``beta`` how much the local inputs differ. The paper's
    ``generate_synthetic.py`` passes alpha and beta to NumPy as standard
    deviations; we follow the paper's text. The two agree for the settings the
    paper reports, (0, 0) and (1, 1), and differ at (0.5, 0.5).

    Parameters
    ----------
    alpha, beta : float
        Non-negative variances of the model and input priors.
    num_clients : int
        Number of clients; each one is a partition of the returned train split.
    seed : int
        Seed of every random draw.
    dim, num_classes : int
        Input dimension and number of classes (60 and 10 in the paper).
    test_fraction : float
        Fraction of each client's samples pooled into the shared test split.

    Returns
    -------
    tuple[CentralDataset, list[numpy.ndarray]]
        The pooled dataset (inputs of shape ``(n, dim)``) and the natural
        partition: for each client, the int64 indices of its samples in ``train_x``.
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    _check_test_fraction(test_fraction)
    rng = np.random.default_rng(seed)
    # Sample counts as in the reference code: lognormal(4, 2) + 50, here capped.
    sizes = np.minimum(rng.lognormal(4, 2, num_clients).astype(int) + 50, _MAX_SYNTHETIC_SAMPLES)
    u = rng.normal(0.0, np.sqrt(alpha), num_clients)
    b_mean = rng.normal(0.0, np.sqrt(beta), num_clients)
    x_std = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt of Sigma_jj = j^-1.2
    train_x, train_y, test_x, test_y, partitions = [], [], [], [], []
    offset = 0
    for k, n_k in enumerate(sizes):
        w = rng.normal(u[k], 1.0, (dim, num_classes))
        b = rng.normal(u[k], 1.0, num_classes)
        v = rng.normal(b_mean[k], 1.0, dim)
        x = rng.normal(v, x_std, (n_k, dim))
        y = np.argmax(x @ w + b, axis=1)  # softmax is monotone, so argmax of the logits
        # Samples are i.i.d. within a client, so the last n_test are an unbiased test split.
        n_train = n_k - int(test_fraction * n_k)
        train_x.append(x[:n_train])
        train_y.append(y[:n_train])
        test_x.append(x[n_train:])
        test_y.append(y[n_train:])
        partitions.append(np.arange(offset, offset + n_train, dtype=np.int64))
        offset += n_train
    central = CentralDataset(
        train_x=torch.from_numpy(np.concatenate(train_x).astype(np.float32)),
        train_y=torch.from_numpy(np.concatenate(train_y).astype(np.int64)),
        test_x=torch.from_numpy(np.concatenate(test_x).astype(np.float32)),
        test_y=torch.from_numpy(np.concatenate(test_y).astype(np.int64)),
        num_classes=num_classes,
    )
    return central, partitions


class _HubDataset(NamedTuple):
    """Where a Hugging Face dataset keeps what :class:`CentralDataset` needs."""

    hf_id: str
    image_column: str
    label_column: str
    channels: int
    # None: the dataset ships a "test" split; else the fraction we hold out of "train".
    held_out_fraction: float | None


_HUB_DATASETS = {
    "mnist": _HubDataset("ylecun/mnist", "image", "label", 1, None),
    # FEMNIST (LEAF) is EMNIST ByClass (62 classes: digits, upper and lower case)
    # with writer ids; it is the EMNIST variant flwr-datasets tests against. It
    # ships one split, so we hold out 10%, the fraction LEAF holds out.
    "emnist": _HubDataset("flwrlabs/femnist", "image", "character", 1, 0.1),
    "cifar10": _HubDataset("uoft-cs/cifar10", "img", "label", 3, None),
}


def _images_to_tensor(split: "hf.Dataset", column: str, channels: int) -> torch.Tensor:
    """Decode a column of PIL images into float32 ``(n, C, H, W)`` in ``[0, 1]``.

    Decoding in batches into one preallocated uint8 array keeps peak memory at
    about the size of the result, without torchvision.
    """
    mode = "L" if channels == 1 else "RGB"
    first = np.asarray(split[0][column].convert(mode))
    out = np.empty((len(split), *first.shape), dtype=np.uint8)  # (n, H, W) or (n, H, W, C)
    start = 0
    for batch in split.iter(batch_size=4096):
        images = [np.asarray(image.convert(mode)) for image in batch[column]]
        out[start : start + len(images)] = np.stack(images)
        start += len(images)
    x = out[:, None] if channels == 1 else out.transpose(0, 3, 1, 2)  # -> (n, C, H, W)
    return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)


def load_flwr_dataset(name: str, *, seed: int = 0) -> CentralDataset:
    """Download a real dataset from the Hugging Face Hub, as flwr-datasets does.

    Parameters
    ----------
    name : str
        One of ``"mnist"`` (1x28x28, 10 classes), ``"emnist"`` (FEMNIST,
        1x28x28, 62 classes) or ``"cifar10"`` (3x32x32, 10 classes).
    seed : int
        Seed of the held-out split for datasets that ship without a test split
        (``"emnist"``); official test splits are used as they are.

    Returns
    -------
    CentralDataset
        Channel-first float32 images scaled to ``[0, 1]``.

    Raises
    ------
    DatasetUnavailableError
        When the Hub cannot be reached and the dataset is not cached.
    """
    import datasets as hf

    if name not in _HUB_DATASETS:
        raise ValueError(f"name must be one of {sorted(_HUB_DATASETS)}, got {name!r}")
    spec = _HUB_DATASETS[name]
    try:
        splits = hf.load_dataset(spec.hf_id)
    except ConnectionError as err:
        raise DatasetUnavailableError(
            f"dataset {name!r} ({spec.hf_id}) needs internet access to the Hugging Face Hub; "
            'offline, use "digits" or "synthetic"'
        ) from err
    train = splits["train"]
    if spec.held_out_fraction is None:
        test = splits["test"]
    else:
        held_out = train.train_test_split(test_size=spec.held_out_fraction, seed=seed)
        train, test = held_out["train"], held_out["test"]
    return CentralDataset(
        train_x=_images_to_tensor(train, spec.image_column, spec.channels),
        train_y=torch.from_numpy(np.asarray(train[spec.label_column], dtype=np.int64)),
        test_x=_images_to_tensor(test, spec.image_column, spec.channels),
        test_y=torch.from_numpy(np.asarray(test[spec.label_column], dtype=np.int64)),
        num_classes=train.features[spec.label_column].num_classes,
    )
