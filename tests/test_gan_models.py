import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from fedsim.models.gs_wgan import (
    paper_discriminator,
    paper_generator,
    pixel_norm,
    sample_latent,
    small_discriminator,
    small_generator,
)

DIGITS, MNIST = (1, 8, 8), (1, 28, 28)


def build(factory, shape=DIGITS, seed=0, **params):
    torch.manual_seed(seed)
    return factory(input_shape=shape, num_classes=10, **params)


def batch(n, seed=0, shape=DIGITS):
    rng = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=rng), torch.randint(10, (n,), generator=rng)


@pytest.mark.parametrize(
    ("factory", "shape", "params"),
    [
        (small_generator, DIGITS, {}),
        (paper_generator, MNIST, {}),  # the paper's width 256
        (paper_generator, (3, 28, 28), {"width": 16, "latent_dim": 4}),
    ],
)
def test_generators_make_images_in_the_unit_interval(factory, shape, params):
    generator = build(factory, shape, **params)
    latent_dim = params.get("latent_dim", 10)
    z = sample_latent(3, latent_dim, torch.Generator().manual_seed(1))

    images = generator(z, torch.tensor([0, 4, 9]))

    assert images.shape == (3, *shape)
    assert images.min() >= 0 and images.max() <= 1
    assert (generator.latent_dim, generator.num_classes) == (latent_dim, 10)
    assert generator.image_shape == shape


@pytest.mark.parametrize(
    ("factory", "shape"), [(small_discriminator, DIGITS), (paper_discriminator, MNIST)]
)
def test_discriminators_score_each_image_once(factory, shape):
    images, labels = batch(5, shape=shape)

    scores = build(factory, shape)(images, labels)

    assert scores.shape == (5,)


@pytest.mark.parametrize(
    ("factory", "shape"),
    [
        (small_generator, DIGITS),
        (paper_generator, MNIST),
        (small_discriminator, DIGITS),
        (paper_discriminator, MNIST),
    ],
)
def test_every_weight_is_spectrally_normalized_and_nothing_mixes_samples(factory, shape):
    model = build(factory, shape)
    weighted = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear | nn.Embedding)]

    assert weighted
    for module in weighted:
        assert parametrize.is_parametrized(module, "weight")
        assert type(module.parametrizations.weight[0]).__name__ == "_SpectralNorm"
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())


def test_spectral_norm_converges_to_unit_largest_singular_value():
    model = build(small_discriminator)
    for module in (model.features[0], model.features[2], model.linear, model.embed):
        for _ in range(100):  # each read in training mode is one power iteration
            weight = module.weight

        sigma = torch.linalg.matrix_norm(weight.detach().flatten(1), ord=2)

        assert sigma.item() == pytest.approx(1.0, abs=1e-3)


def test_pixel_norm_by_hand():
    x = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # mean square over channels: 12.5

    out = pixel_norm(x)

    expected = torch.tensor([3.0, 4.0]) / math.sqrt(12.5)
    torch.testing.assert_close(out.flatten(), expected)


def test_pixel_norm_gives_unit_mean_square_over_channels():
    x = 7 * torch.randn(4, 16, 5, 5, generator=torch.Generator().manual_seed(0))

    mean_square = pixel_norm(x).pow(2).mean(dim=1)

    torch.testing.assert_close(mean_square, torch.ones(4, 5, 5))


def test_projection_score_is_linear_plus_label_embedding_dot_features():
    model = build(small_discriminator).eval()  # eval: no power iteration between reads
    images, labels = batch(6)

    with torch.no_grad():
        scores = model(images, labels)
        h = model.features(images)
        linear = model.linear.parametrizations.weight
        weight = linear.original / (linear[0]._u @ linear.original @ linear[0]._v)
        embed = model.embed.parametrizations.weight
        table = embed.original / (embed[0]._u @ embed.original @ embed[0]._v)
        expected = h @ weight[0] + model.linear.bias + (table[labels] * h).sum(dim=1)

    torch.testing.assert_close(scores, expected)


def test_changing_the_labels_changes_the_scores():
    model = build(small_discriminator).eval()
    images, labels = batch(6)

    with torch.no_grad():
        delta = model(images, (labels + 1) % 10) - model(images, labels)

    assert (delta.abs() > 1e-6).all()


def test_sample_latent_is_seeded_binary_and_fair():
    n, latent_dim = 1000, 10

    first = sample_latent(n, latent_dim, torch.Generator().manual_seed(3))
    again = sample_latent(n, latent_dim, torch.Generator().manual_seed(3))
    other = sample_latent(n, latent_dim, torch.Generator().manual_seed(4))

    assert first.shape == (n, latent_dim) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    standard_error = 0.5 / math.sqrt(n * latent_dim)  # Bernoulli(1/2): sd 1/2 per draw
    assert abs(first.mean().item() - 0.5) < 5 * standard_error


@pytest.mark.parametrize(
    ("factory", "shape"),
    [
        (paper_generator, DIGITS),
        (paper_generator, (28, 28)),
        (small_generator, MNIST),
        (paper_discriminator, (1, 32, 32)),
        (small_discriminator, (1, 8, 7)),
    ],
)
def test_factories_refuse_other_image_shapes_in_one_line(factory, shape):
    with pytest.raises(ValueError, match=r"needs input_shape \(C, \d+, \d+\), got") as error:
        factory(input_shape=shape, num_classes=10)

    assert "\n" not in str(error.value)
    assert factory.__name__ in str(error.value)


def test_factories_refuse_nonpositive_sizes():
    with pytest.raises(ValueError, match="small_generator needs width >= 1, got 0"):
        small_generator(DIGITS, 10, width=0)
    with pytest.raises(ValueError, match="small_discriminator needs num_classes >= 1, got 0"):
        small_discriminator(DIGITS, 0)


@pytest.mark.parametrize("factory", [small_generator, small_discriminator])
def test_same_seed_same_weights(factory):
    first, again, other = build(factory), build(factory), build(factory, seed=1)

    # the state includes spectral norm's power-iteration vectors _u and _v
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert not torch.equal(next(first.parameters()), next(other.parameters()))


def test_state_dict_round_trips_into_a_fresh_discriminator():
    trained = build(small_discriminator)
    images, labels = batch(4)
    trained(images, labels)  # a training-mode forward moves the power-iteration vectors
    fresh = build(small_discriminator, seed=1)

    fresh.load_state_dict(trained.state_dict())

    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images, labels), trained.eval()(images, labels))


@pytest.mark.parametrize(
    ("factory", "shape"), [(small_discriminator, DIGITS), (paper_discriminator, MNIST)]
)
def test_score_i_has_no_gradient_from_image_j(factory, shape):
    # The sanitizer clips each fake image's gradient: sample i's score must see image i alone.
    model = build(factory, shape)  # training mode, as during training
    images, labels = batch(4, shape=shape)
    images.requires_grad_(True)
    scores = model(images, labels)

    for i in range(4):
        (gradient,) = torch.autograd.grad(scores[i], images, retain_graph=True)
        others = torch.cat([gradient[:i], gradient[i + 1 :]])

        assert torch.count_nonzero(others) == 0
        assert gradient[i].abs().sum() > 0


def test_small_pair_passes_gradient_to_every_generator_parameter():
    generator, discriminator = build(small_generator), build(small_discriminator)
    z = sample_latent(8, 10, torch.Generator().manual_seed(0))
    labels = torch.arange(8)

    discriminator(generator(z, labels), labels).mean().backward()

    for name, parameter in generator.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
