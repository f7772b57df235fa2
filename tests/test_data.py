"""Tests of fedsim.data: loaders, partitioners and the federated view. No network."""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets as hf
import numpy as np
import pytest
import torch
from PIL import Image

from fedsim.data import (
    CentralDataset,
    DatasetUnavailableError,
    FederatedData,
    build_federated_data,
    label_skew,
    load_digits,
    load_flwr_dataset,
    load_synthetic,
    partition_indices,
)

# datasets' sort (used by ShardPartitioner) trips a pyarrow deprecation that is not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Specifying null_placement:FutureWarning")

SCHEMES = ["iid", "dirichlet", "shards"]


@pytest.fixture(scope="module")
def digits() -> CentralDataset:
    return load_digits(seed=0)


@pytest.fixture(scope="module")
def digits_labels(digits: CentralDataset) -> np.ndarray:
    return digits.train_y.numpy()


def expected_iid_skew(sizes: list[int], p: np.ndarray) -> float:
    """Exact E[label_skew] when each partition is a uniform sample of ``size`` labels.

    Each class count is then Binomial(size, p_k), so E|count/size - p_k| is a
    finite sum; sampling without replacement makes the true value slightly smaller.
    """
    total = 0.0
    for size in sizes:
        tv = 0.0
        for p_k in p:
            tv += sum(
                math.comb(size, x) * p_k**x * (1 - p_k) ** (size - x) * abs(x / size - p_k)
                for x in range(size + 1)
            )
        total += size * 0.5 * tv
    return total / sum(sizes)


# --- digits -------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_range(digits: CentralDataset) -> None:
    assert digits.train_x.shape == (1437, 1, 8, 8)
    assert digits.test_x.shape == (360, 1, 8, 8)
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    all_x = torch.cat([digits.train_x, digits.test_x])
    assert all_x.min().item() == 0.0 and all_x.max().item() == 1.0


def test_digits_split_is_stratified(digits: CentralDataset) -> None:
    # 1797 digits hold 174-183 per class; a stratified 20% split keeps 34-37 of each.
    test_counts = torch.bincount(digits.test_y, minlength=10)
    assert test_counts.min().item() >= 34 and test_counts.max().item() <= 37


def test_digits_same_seed_same_split_other_seed_other_split(digits: CentralDataset) -> None:
    again = load_digits(seed=0)
    other = load_digits(seed=1)
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.test_y, digits.test_y)
    assert not torch.equal(other.train_x, digits.train_x)


def test_digits_rejects_bad_test_fraction() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


# --- synthetic ----------------------------------------------------------------------


def test_synthetic_is_deterministic_from_seed() -> None:
    first, parts = load_synthetic(alpha=0.5, beta=0.5, num_clients=10, seed=7)
    again, parts_again = load_synthetic(alpha=0.5, beta=0.5, num_clients=10, seed=7)
    other, _ = load_synthetic(alpha=0.5, beta=0.5, num_clients=10, seed=8)
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_y, again.test_y)
    assert all(np.array_equal(a, b) for a, b in zip(parts, parts_again, strict=True))
    assert first.train_x.shape[0] != other.train_x.shape[0] or not torch.equal(
        first.train_x, other.train_x
    )


def test_synthetic_natural_partition_is_disjoint_and_complete() -> None:
    central, parts = load_synthetic(alpha=1.0, beta=1.0, num_clients=30, seed=0, dim=20)
    assert central.input_shape == (20,)
    assert len(parts) == 30
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == central.train_x.shape[0]
    # Each client draws 50..1000 samples and keeps 80% (rounded up) for training.
    assert all(40 <= len(p) <= 800 for p in parts)


def test_synthetic_input_heterogeneity_matches_beta_as_a_variance() -> None:
    # Client k's mean input, averaged over the dim coordinates, is about B_k + mean(v_k - B_k),
    # so across clients its variance is beta + 1/dim. beta is a variance: read as a
    # standard deviation, beta=0.25 would give 0.0625 + 1/60 = 0.079 instead of 0.267.
    # With 200 clients the sample variance has a relative s.d. of ~10%.
    for beta in (0.0, 0.25, 1.0):
        central, parts = load_synthetic(alpha=1.0, beta=beta, num_clients=200, seed=0)
        x = central.train_x.numpy()
        client_means = np.array([x[p].mean() for p in parts])
        assert client_means.var(ddof=1) == pytest.approx(beta + 1 / 60, rel=0.3)


def test_synthetic_alpha_does_not_change_the_data() -> None:
    # u_k shifts every logit of a sample by the same amount (u_k * (sum(x) + 1)), and
    # argmax ignores a common shift: alpha changes the hidden models, not the data.
    small, _ = load_synthetic(alpha=0.0, beta=0.5, num_clients=10, seed=3)
    large, _ = load_synthetic(alpha=4.0, beta=0.5, num_clients=10, seed=3)
    assert torch.equal(small.train_y, large.train_y) and torch.equal(small.test_x, large.test_x)


def test_synthetic_rejects_negative_variance() -> None:
    with pytest.raises(ValueError, match="beta"):
        load_synthetic(alpha=1.0, beta=-1.0, num_clients=5)


# --- partitioners -------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_are_disjoint_sorted_and_deterministic(
    scheme: str, digits_labels: np.ndarray
) -> None:
    parts = partition_indices(digits_labels, scheme=scheme, num_partitions=100, seed=0)
    again = partition_indices(digits_labels, scheme=scheme, num_partitions=100, seed=0)
    other = partition_indices(digits_labels, scheme=scheme, num_partitions=100, seed=1)
    joined = np.concatenate(parts)
    assert len(parts) == 100
    assert len(joined) == len(np.unique(joined))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_iid_and_dirichlet_cover_every_sample(scheme: str, digits_labels: np.ndarray) -> None:
    parts = partition_indices(digits_labels, scheme=scheme, num_partitions=100, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1437))


def test_shards_drop_only_the_remainder(digits_labels: np.ndarray) -> None:
    # 200 shards of floor(1437 / 200) = 7 samples: 1400 used, 37 left out; every
    # partition holds exactly 2 shards.
    parts = partition_indices(digits_labels, scheme="shards", num_partitions=100, seed=0)
    assert [len(p) for p in parts] == [14] * 100


def test_shards_bound_labels_per_partition(digits_labels: np.ndarray) -> None:
    # Shards are contiguous in label-sorted order, so a shard of 7 samples (fewer than
    # any class holds) spans at most 2 labels: one more than 1 only if it straddles one
    # of the 9 class boundaries. Hence <= 2 * s labels per partition, and over all
    # partitions <= (number of shards) + 9.
    s = 2
    parts = partition_indices(
        digits_labels, scheme="shards", num_partitions=100, seed=0, shards_per_partition=s
    )
    distinct = [len(np.unique(digits_labels[p])) for p in parts]
    assert max(distinct) <= 2 * s
    assert sum(distinct) <= 100 * s + 9


def test_iid_skew_is_sampling_noise_even_on_sorted_labels(digits_labels: np.ndarray) -> None:
    # Sorted labels catch a partitioner that cuts contiguous blocks without shuffling
    # (each block would hold one or two classes: skew near 0.85).
    labels = np.sort(digits_labels)
    parts = partition_indices(labels, scheme="iid", num_partitions=100, seed=0)
    p = np.bincount(labels, minlength=10) / len(labels)
    expected = expected_iid_skew([len(q) for q in parts], p)  # about 0.33 for 14-15 samples
    assert label_skew(labels, parts, 10) == pytest.approx(expected, abs=0.04)
    few = partition_indices(labels, scheme="iid", num_partitions=5, seed=0)
    assert label_skew(labels, few, 10) < 0.1


def test_dirichlet_skew_grows_as_alpha_shrinks(digits_labels: np.ndarray) -> None:
    skews = [
        label_skew(
            digits_labels,
            partition_indices(
                digits_labels, scheme="dirichlet", num_partitions=100, seed=0, alpha=alpha
            ),
            10,
        )
        for alpha in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < skews[1] < skews[2]


def test_label_skew_hand_computed() -> None:
    labels = np.array([0, 0, 1, 1])
    # Global (1/2, 1/2). Pure partitions: TV 1/2 each. One mixed partition: TV 0.
    assert label_skew(labels, [np.array([0, 1]), np.array([2, 3])], 2) == pytest.approx(0.5)
    assert label_skew(labels, [np.array([0, 2, 1, 3]), np.array([], dtype=np.int64)], 2) == 0.0
    # Weighted: sizes 3 and 1, TVs 1/6 and 1/2 -> (3 * 1/6 + 1 * 1/2) / 4 = 1/4.
    assert label_skew(labels, [np.array([0, 1, 2]), np.array([3])], 2) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_partitions": 0}, "num_partitions"),
        ({"num_partitions": 1438}, "num_partitions"),
        ({"alpha": 0.0}, "alpha"),
        ({"shards_per_partition": 0}, "shards_per_partition"),
        ({"scheme": "pathological"}, "scheme"),
        ({"scheme": "shards", "num_partitions": 1000}, "shards_per_partition"),
    ],
)
def test_partition_rejects_bad_input(
    kwargs: dict, argument: str, digits_labels: np.ndarray
) -> None:
    call = {"scheme": "dirichlet", "num_partitions": 10, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=argument):
        partition_indices(digits_labels, **call)


def test_num_partitions_error_names_dataset_size(digits_labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="1437"):
        partition_indices(digits_labels, scheme="iid", num_partitions=2000, seed=0)


# --- federated view -----------------------------------------------------------------


def test_build_federated_digits() -> None:
    data = build_federated_data(dataset="digits", partitioner="dirichlet", num_clients=10, seed=0)
    assert data.num_partitions == 10
    sizes = [len(data.client_dataset(i)) for i in range(10)]
    assert sum(sizes) == 1437
    x, y = data.client_dataset(3)[0]
    assert x.shape == (1, 8, 8) and y.dtype == torch.int64
    assert len(data.test_dataset()) == 360
    with pytest.raises(ValueError, match="partition_id"):
        data.client_dataset(10)


def test_client_dataset_is_the_partition(digits: CentralDataset) -> None:
    data = FederatedData(central=digits, partitions=(np.array([4, 9]), np.array([0])))
    x, y = data.client_dataset(0).tensors
    assert torch.equal(x, digits.train_x[[4, 9]]) and torch.equal(y, digits.train_y[[4, 9]])


def test_federated_data_rejects_foreign_partition(digits: CentralDataset) -> None:
    with pytest.raises(ValueError, match="partitions"):
        FederatedData(central=digits, partitions=(np.array([0, 1437]),))


def test_build_federated_synthetic_uses_natural_partition() -> None:
    data = build_federated_data(
        dataset="synthetic", partitioner="natural", num_clients=8, seed=0, synthetic_beta=0.0
    )
    _, natural = load_synthetic(alpha=1.0, beta=0.0, num_clients=8, seed=0)
    assert data.num_partitions == 8
    assert all(np.array_equal(a, b) for a, b in zip(data.partitions, natural, strict=True))


@pytest.mark.parametrize(
    ("dataset", "partitioner", "argument"),
    [
        ("digits", "natural", "partitioner"),
        ("synthetic", "iid", "partitioner"),
        ("imagenet", "iid", "dataset"),
        ("digits", "random", "partitioner"),
    ],
)
def test_build_rejects_bad_combination(dataset: str, partitioner: str, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        build_federated_data(dataset=dataset, partitioner=partitioner, num_clients=4, seed=0)


# --- Hugging Face datasets (never downloads) ----------------------------------------


def test_flwr_dataset_unknown_name() -> None:
    with pytest.raises(ValueError, match="mnist"):
        load_flwr_dataset("imagenet")


def test_flwr_dataset_translates_connection_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar10' on the Hub")

    monkeypatch.setattr(hf, "load_dataset", unreachable)
    with pytest.raises(DatasetUnavailableError, match="cifar10.*internet.*digits"):
        load_flwr_dataset("cifar10")


def test_flwr_dataset_offline_fails_fast(tmp_path: Path) -> None:
    # A fresh process, because the Hub libraries read the offline switches at import;
    # an empty HF_HOME so that a user's cache cannot satisfy the request.
    script = textwrap.dedent(
        """
        import time
        from fedsim.data import DatasetUnavailableError, load_flwr_dataset
        start = time.perf_counter()
        try:
            load_flwr_dataset("mnist")
        except DatasetUnavailableError as err:
            print(f"{time.perf_counter() - start:.3f}", err)
        """
    )
    env = os.environ | {
        "HF_HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout, result.stderr
    seconds, message = result.stdout.strip().split(" ", 1)
    assert float(seconds) < 5.0
    assert "mnist" in message and "Hugging Face Hub" in message and "synthetic" in message
    assert "\n" not in message


def _fake_hub(
    images: list[Image.Image], label_column: str, splits: tuple[str, ...]
) -> hf.DatasetDict:
    features = hf.Features({"image": hf.Image(), label_column: hf.ClassLabel(num_classes=7)})
    split = hf.Dataset.from_dict(
        {"image": images, label_column: [i % 7 for i in range(len(images))]}, features=features
    )
    return hf.DatasetDict({name: split for name in splits})


def test_flwr_dataset_converts_grayscale_images(monkeypatch: pytest.MonkeyPatch) -> None:
    # Image i is filled with the value 10 * i, so its pixels must read back as 10 * i / 255.
    images = [Image.new("L", (28, 28), color=10 * i) for i in range(20)]
    monkeypatch.setattr(hf, "load_dataset", lambda _: _fake_hub(images, "label", ("train", "test")))
    central = load_flwr_dataset("mnist")
    assert central.train_x.shape == (20, 1, 28, 28) and central.num_classes == 7
    assert central.train_x.dtype == torch.float32
    expected = torch.arange(20, dtype=torch.float32) * 10 / 255
    assert torch.allclose(central.train_x.amax(dim=(1, 2, 3)), expected)
    assert torch.equal(central.test_y, torch.arange(20) % 7)


def test_flwr_dataset_converts_rgb_channel_first(monkeypatch: pytest.MonkeyPatch) -> None:
    images = [Image.new("RGB", (32, 32), color=(255, 0, 51)) for _ in range(6)]

    def fake_load(name: str) -> hf.DatasetDict:
        dataset = _fake_hub(images, "label", ("train", "test"))
        return dataset.rename_column("image", "img")

    monkeypatch.setattr(hf, "load_dataset", fake_load)
    central = load_flwr_dataset("cifar10")
    assert central.input_shape == (3, 32, 32)
    assert torch.equal(central.train_x[:, :, 5, 7], torch.tensor([[1.0, 0.0, 0.2]] * 6))


def test_flwr_dataset_holds_out_femnist_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    images = [Image.new("L", (28, 28), color=i) for i in range(50)]
    monkeypatch.setattr(hf, "load_dataset", lambda _: _fake_hub(images, "character", ("train",)))
    central = load_flwr_dataset("emnist", seed=0)
    assert central.train_x.shape[0] == 45 and central.test_x.shape[0] == 5
    # Disjoint: every image has its own fill value.
    pixels = torch.cat([central.train_x, central.test_x])[:, 0, 0, 0]
    assert len(torch.unique(pixels)) == 50
