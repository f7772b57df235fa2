import math
from collections.abc import Iterator

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from torch import nn

from fedsim.data.datasets import load_digits
from fedsim.generative_eval import (
    SINGULAR_EPS,
    accuracy,
    features,
    frechet_distance,
    sample_quality,
    save_sample_grid,
    train_classifier,
)

EPS = np.finfo(np.float64).eps


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # A convolution on 8x8 images is too small to share between threads; on a busy
    # machine extra threads only oversubscribe the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_digits(test_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def classifier(digits):
    # Batch 32 instead of the paper's 128: four times the steps per epoch on 1,437 images.
    return train_classifier(digits.train_x, digits.train_y, 10, epochs=10, seed=0, batch_size=32)


def with_moments(mean, cov, n, seed):
    """n samples whose sample mean and unbiased sample covariance are exactly mean, cov."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = np.linalg.solve(np.linalg.cholesky(np.cov(z, rowvar=False)), z.T).T  # cov(z) = I
    return np.asarray(mean) + z @ np.linalg.cholesky(cov).T


def slow_frechet(mean_a, cov_a, mean_b, cov_b):
    """Reference: Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), symmetric eighs."""

    def psd_sqrt(m):
        values, vectors = np.linalg.eigh(m)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    root_a = psd_sqrt(cov_a)
    cross = np.trace(psd_sqrt(root_a @ cov_b @ root_a))
    diff = np.subtract(mean_a, mean_b)
    return diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * cross


def weights(model):
    return list(model.state_dict().values())


def random_cov(d, seed):
    m = np.random.default_rng(seed).standard_normal((d, d))
    return m @ m.T / d + 0.1 * np.eye(d)


# --- frechet_distance ---------------------------------------------------------------


def test_frechet_distance_of_a_set_with_itself_is_zero_up_to_rounding():
    a = with_moments(np.arange(8.0), random_cov(8, seed=1), n=400, seed=2)

    distance = frechet_distance(a, a)

    # sqrtm of a well-conditioned symmetric product is accurate to a small multiple of
    # d * eps relative to its norm; the trace sums d such entries.
    assert abs(distance) < 100 * 8 * EPS * np.trace(np.cov(a, rowvar=False))


def test_frechet_distance_matches_the_2x2_closed_form():
    # For 2x2 S with eigenvalues l1, l2 >= 0: Tr(S^(1/2)) = sqrt(l1 + l2 + 2 sqrt(l1 l2))
    # = sqrt(Tr S + 2 sqrt(det S)). Here S_a S_b = [[2, 4], [1, 8]]: Tr 10, det 3 * 4 = 12.
    cov_a, cov_b = np.array([[2.0, 1.0], [1.0, 2.0]]), np.diag([1.0, 4.0])
    a = with_moments([0.0, 0.0], cov_a, n=50, seed=0)
    b = with_moments([1.0, 2.0], cov_b, n=70, seed=1)
    expected = (1 + 4) + (4 + 5) - 2 * math.sqrt(10 + 2 * math.sqrt(12))  # 5.7711...

    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_diagonal_gaussians_is_a_sum_of_root_differences():
    # Commuting covariances: the trace term is sum_i (sqrt(a_i) - sqrt(b_i))^2.
    var_a, var_b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 4.0, 1.0, 1.0])
    mean_b = np.array([0.0, 3.0, 0.0, 4.0])
    a = with_moments(np.zeros(4), np.diag(var_a), n=200, seed=3)
    b = with_moments(mean_b, np.diag(var_b), n=300, seed=4)
    expected = 25 + (1 + 0 + 4 + 0.25)

    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_a_slow_reference_on_random_gaussians():
    cov_a, cov_b = random_cov(16, seed=5), random_cov(16, seed=6)
    mean_a, mean_b = np.linspace(-1, 1, 16), np.zeros(16)
    a = with_moments(mean_a, cov_a, n=100, seed=7)
    b = with_moments(mean_b, cov_b, n=100, seed=8)

    expected = slow_frechet(mean_a, cov_a, mean_b, cov_b)

    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)  # symmetric


def test_translating_one_set_by_v_adds_the_squared_norm_of_v():
    a = np.random.default_rng(9).standard_normal((300, 6)) @ np.triu(np.ones((6, 6)))
    b = np.random.default_rng(10).standard_normal((200, 6))
    v = np.array([1.0, -2.0, 0.5, 0.0, 3.0, -1.0])  # ||v||^2 = 15.25

    assert frechet_distance(a, a + v) == pytest.approx(15.25, rel=1e-10)
    assert frechet_distance(a, b + v) - frechet_distance(a, b) == pytest.approx(
        15.25 - 2 * v @ (a.mean(axis=0) - b.mean(axis=0)), rel=1e-10
    )


def test_singular_covariances_are_regularized_on_both_sides():
    # 5 samples of 10 features, one of them constant: covariances of rank 4.
    a = np.random.default_rng(11).standard_normal((5, 10))
    b = np.random.default_rng(12).standard_normal((5, 10)) + 1.0
    a[:, 3] = b[:, 3] = 0.5
    offset = SINGULAR_EPS * np.eye(10)
    cov_a, cov_b = np.cov(a, rowvar=False) + offset, np.cov(b, rowvar=False) + offset

    expected = slow_frechet(a.mean(axis=0), cov_a, b.mean(axis=0), cov_b)

    # Regularizing only inside the square root, or not at all, would be off by ~1e-6.
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # The trace terms carry the offset too, so a set stays at distance ~0 from itself.
    # Rounding: an error delta ~ eps * ||S|| in S = (cov + offset)^2 moves the root of an
    # eigenvalue lambda by delta / (2 sqrt(lambda)), and sqrt(lambda) >= SINGULAR_EPS.
    product_norm = np.linalg.norm(cov_a @ cov_a, 2)
    assert abs(frechet_distance(a, a)) < 10 * EPS * product_norm / (2 * SINGULAR_EPS)


@pytest.mark.parametrize(
    ("shape_a", "shape_b"),
    [((10, 3), (10, 4)), ((1, 3), (10, 3)), ((10, 3), (1, 3)), ((10,), (10,))],
    ids=["feature-dims", "one-row-a", "one-row-b", "not-2d"],
)
def test_frechet_distance_refuses_bad_shapes(shape_a, shape_b):
    with pytest.raises(ValueError, match="frechet_distance needs two"):
        frechet_distance(np.zeros(shape_a), np.zeros(shape_b))


# --- classifier --------------------------------------------------------------------


def test_train_classifier_learns_digits(digits, classifier):
    assert not classifier.training
    assert accuracy(classifier, digits.test_x, digits.test_y) > 0.9


def test_train_classifier_is_a_function_of_its_seed_and_leaves_global_rng_alone(digits):
    x, y = digits.train_x[:256], digits.train_y[:256]

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = train_classifier(x, y, 10, epochs=2, seed=4)
    after = torch.get_rng_state()
    torch.manual_seed(999)  # a different global state must not matter
    second = train_classifier(x, y, 10, epochs=2, seed=4)
    other = train_classifier(x, y, 10, epochs=2, seed=5)

    assert torch.equal(state, after)
    assert all(map(torch.equal, weights(first), weights(second)))
    assert not all(map(torch.equal, weights(first), weights(other)))


def test_train_classifier_refuses_labels_outside_the_classes(digits):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        train_classifier(digits.train_x, digits.train_y, 5, epochs=1, seed=0)


def test_accuracy_counts_arg_max_matches():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(10, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    predicted = model(x).argmax(dim=1)
    half_wrong = torch.where(torch.arange(10) < 5, predicted, (predicted + 1) % 3)

    assert accuracy(model, x, predicted, batch_size=3) == 1.0
    assert accuracy(model, x, (predicted + 1) % 3) == 0.0
    assert accuracy(model, x, half_wrong, batch_size=4) == 0.5


def test_features_are_the_inputs_of_the_last_linear(digits, classifier):
    x = digits.test_x[:50]

    feats = features(classifier, x, batch_size=16)

    assert feats.shape == (50, 64) and feats.dtype == np.float64  # cnn's hidden width
    with torch.no_grad():
        logits = classifier[-1](torch.from_numpy(feats).float())
        torch.testing.assert_close(logits, classifier(x))


def test_features_refuses_a_model_without_a_final_linear():
    with pytest.raises(TypeError, match="nn.Sequential ending in nn.Linear"):
        features(nn.Sequential(nn.Flatten(), nn.ReLU()), torch.zeros(2, 1, 8, 8))


# --- save_sample_grid --------------------------------------------------------------


def test_save_sample_grid_draws_one_row_per_class_in_label_order(tmp_path):
    # Class c's images are the constant grey c / 2; the labels arrive out of order.
    labels = torch.tensor([2, 0, 1, 2, 0, 1, 1, 2, 0, 0, 1, 2, 0])
    images = (labels.float() / 2).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    path = tmp_path / "new" / "folder" / "grid.png"

    returned = save_sample_grid(images, labels, path, per_class=4, title="digits")

    assert returned == path and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = mpimg.imread(path)
    # 3 rows x 4 columns of 8x8 cells with 1-pixel gutters: 28 x 37, drawn at 8 screen
    # pixels per pixel (64 // 8), under a 32-pixel title band.
    assert png.shape[:2] == (32 + 28 * 8, 37 * 8)
    for row in range(3):
        centre_y = 32 + (1 + row * 9 + 4) * 8
        for col in range(4):
            centre_x = (1 + col * 9 + 4) * 8
            assert png[centre_y, centre_x, 0] == pytest.approx(row / 2, abs=1 / 255)


def test_save_sample_grid_without_title_has_no_band(tmp_path):
    images = torch.rand(6, 28, 28, generator=torch.Generator().manual_seed(0))

    png = mpimg.imread(save_sample_grid(images, torch.arange(6) % 2, tmp_path / "g.png"))

    # 2 rows x 10 columns of 28x28 cells with gutters, at 64 // 28 = 2 screen pixels.
    assert png.shape[:2] == ((2 * 29 + 1) * 2, (10 * 29 + 1) * 2)


# --- sample_quality ----------------------------------------------------------------


def test_sample_quality_of_real_data_matches_the_ceiling_and_beats_noise(digits):
    real = (digits.train_x, digits.train_y, digits.test_x, digits.test_y)
    noise = torch.rand(digits.train_x.shape, generator=torch.Generator().manual_seed(0))

    as_real, reference = sample_quality(*real[:2], *real, 10, epochs=5, seed=0)
    as_noise, reused = sample_quality(
        noise, digits.train_y, *real, 10, epochs=5, seed=0, reference=reference
    )

    # Same images, labels, seed and trainer: the downstream classifier is the reference.
    assert as_real.downstream_accuracy == as_real.real_accuracy
    assert reused is reference and as_noise.real_accuracy == as_real.real_accuracy
    assert as_noise.downstream_accuracy < as_real.downstream_accuracy
    # The property the measure exists for: real samples are an order of magnitude closer
    # to the real test split than noise is (observed: about a hundred times closer).
    assert 0 <= as_real.frechet_distance < as_noise.frechet_distance / 10


def test_sample_quality_refuses_images_of_another_shape(digits):
    with pytest.raises(ValueError, match="differ in shape"):
        sample_quality(
            torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long),
            digits.train_x, digits.train_y, digits.test_x, digits.test_y, 10,
            epochs=1, seed=0,
        )  # fmt: skip
