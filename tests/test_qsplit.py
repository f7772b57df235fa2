"""Tests of the "qsplit" partitioner: i.i.d. fraction q, the rest from label-sorted shards."""

import math

import numpy as np
import pytest

from fedsim.config import ConfigError, parse_config
from fedsim.data.datasets import load_digits
from fedsim.data.federated import build_federated_data
from fedsim.data.partition import label_skew, partition_indices, qsplit_indices

NUM_CLASSES = 10
QS = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    return load_digits(seed=0).train_y.numpy()


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("num_partitions", [1, 3, 7, 10, 50])
def test_disjoint_complete_and_balanced(
    digits_labels: np.ndarray, q: float, num_partitions: int
) -> None:
    parts = qsplit_indices(digits_labels, num_partitions=num_partitions, q=q, seed=0)

    assert len(parts) == num_partitions
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    everything = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(digits_labels)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1, sizes


def test_hand_computed_small_case() -> None:
    labels = np.array([1, 0, 1, 0, 1, 0])
    # q = 0: the label-sorted halves, whatever the seed.
    for seed in range(5):
        parts = qsplit_indices(labels, num_partitions=2, q=0.0, seed=seed)
        assert [p.tolist() for p in parts] == [[1, 3, 5], [0, 2, 4]]


def test_iid_end_matches_the_global_histogram(digits_labels: np.ndarray) -> None:
    # At q = 1 every partition is a uniform random subset of size m of the n labels,
    # so its count of class k is hypergeometric: the share has standard error
    # sqrt(p_k (1 - p_k) / m * (n - m) / (n - 1)). Five SEs over 10 x 10 cells fail
    # with probability ~1e-4 under the normal approximation.
    n, num_partitions = len(digits_labels), 10
    global_dist = np.bincount(digits_labels, minlength=NUM_CLASSES) / n
    parts = qsplit_indices(digits_labels, num_partitions=num_partitions, q=1.0, seed=0)
    for part in parts:
        m = len(part)
        se = np.sqrt(global_dist * (1 - global_dist) / m * (n - m) / (n - 1))
        local_dist = np.bincount(digits_labels[part], minlength=NUM_CLASSES) / m
        assert np.all(np.abs(local_dist - global_dist) <= 5 * se)


@pytest.mark.parametrize("num_partitions", [2, 3, 7, 10, 20, 50])
def test_heterogeneous_end_is_contiguous_label_shards(
    digits_labels: np.ndarray, num_partitions: int
) -> None:
    # A contiguous run of L label-sorted samples covers its first and last label
    # plus whole classes between, each of at least m_min samples, so it spans at
    # most floor((L - 2) / m_min) + 2 labels. (With equal class sizes this is the
    # ceil(classes / P) + 1 of the balanced test below; digits' 139-146 per class
    # can push a 144-sample shard over three labels.)
    parts = qsplit_indices(digits_labels, num_partitions=num_partitions, q=0.0, seed=0)
    m_min = np.bincount(digits_labels).min()
    longest = max(len(p) for p in parts)
    bound = min(NUM_CLASSES, (longest - 2) // m_min + 2)
    for part in parts:
        assert len(np.unique(digits_labels[part])) <= bound
        # Contiguous in label order: the labels of one shard form an integer range.
        present = np.unique(digits_labels[part])
        np.testing.assert_array_equal(present, np.arange(present[0], present[-1] + 1))


@pytest.mark.parametrize("num_partitions", [1, 2, 3, 4, 5, 7, 10, 20])
def test_heterogeneous_end_on_balanced_classes(num_partitions: int) -> None:
    labels = np.repeat(np.arange(NUM_CLASSES), 60)
    parts = qsplit_indices(labels, num_partitions=num_partitions, q=0.0, seed=3)
    bound = math.ceil(NUM_CLASSES / num_partitions) + 1
    assert max(len(np.unique(labels[p])) for p in parts) <= bound


def test_heterogeneity_decreases_with_q(digits_labels: np.ndarray) -> None:
    skews = [
        label_skew(
            digits_labels,
            qsplit_indices(digits_labels, num_partitions=10, q=q, seed=0),
            NUM_CLASSES,
        )
        for q in QS
    ]
    assert np.all(np.diff(skews) < 0), skews
    # Ends: ~0.9 (each shard holds 1-2 of 10 classes) and sampling noise only.
    assert skews[0] > 0.8 and skews[-1] < 0.15, skews


def test_seed_reproducible_and_sensitive(digits_labels: np.ndarray) -> None:
    def run(seed: int) -> list[np.ndarray]:
        return qsplit_indices(digits_labels, num_partitions=10, q=0.5, seed=seed)

    same = zip(run(7), run(7), strict=True)
    assert all(np.array_equal(a, b) for a, b in same)
    assert not all(np.array_equal(a, b) for a, b in zip(run(7), run(8), strict=True))


@pytest.mark.parametrize("q", [-0.1, 1.5, math.nan])
def test_bad_q_raises_naming_it(digits_labels: np.ndarray, q: float) -> None:
    with pytest.raises(ValueError, match=rf"q must be in \[0, 1\], got {q}"):
        qsplit_indices(digits_labels, num_partitions=10, q=q, seed=0)


def test_bad_labels_and_partition_count_raise() -> None:
    with pytest.raises(ValueError, match="1-D integer array"):
        qsplit_indices(np.array([0.5, 1.0]), num_partitions=1, q=0.5, seed=0)
    with pytest.raises(ValueError, match="got 4"):
        qsplit_indices(np.array([0, 1, 2]), num_partitions=4, q=0.5, seed=0)


def test_registered_with_partition_indices_and_the_builder() -> None:
    direct = partition_indices(
        np.repeat(np.arange(4), 5), scheme="qsplit", num_partitions=4, seed=2, q=0.25
    )
    expected = qsplit_indices(np.repeat(np.arange(4), 5), num_partitions=4, q=0.25, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(direct, expected, strict=True))

    data = build_federated_data(
        dataset="digits", partitioner="qsplit", num_clients=10, seed=1, q=0.5
    )
    expected = qsplit_indices(data.central.train_y.numpy(), num_partitions=10, q=0.5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(data.partitions, expected, strict=True))


def test_config_accepts_qsplit_and_checks_q() -> None:
    config = parse_config({"data": {"partitioner": "qsplit", "q": 0.5}})
    assert config.data.partitioner == "qsplit" and config.data.q == 0.5
    assert parse_config({}).data.q == 0.0
    with pytest.raises(ConfigError, match=r"data\.q = 2\.0 is out of range; expected a number"):
        parse_config({"data": {"partitioner": "qsplit", "q": 2}})
