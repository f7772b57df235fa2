"""GS-WGAN's class-conditional generator and projection discriminator.

Chen, Orekondy & Fritz, "GS-WGAN: A Gradient-Sanitized Approach for Learning
Differentially Private Generators", NeurIPS 2020 (arXiv:2006.08265). The layers follow
the authors' ``GeneratorResNet`` and ``DiscriminatorDCGAN``:

* **Generator.** A latent ``z`` in {0, 1}^latent_dim (Bernoulli(1/2), :func:`sample_latent`)
  concatenated with the one-hot label goes through a linear layer to a ``width x s x s``
  map, then ReLU and pixel-norm, then residual up-blocks that each double the side
  (main path: pixel-norm, nearest x2 upsample, conv3x3, pixel-norm, ReLU, conv3x3;
  shortcut: nearest x2 upsample, conv1x1), then a conv3x3 to the image channels and a
  sigmoid, so pixels lie in [0, 1]. The paper's model maps 4x4 to 32x32 with width 256;
  its output conv has no padding (32 -> 30) and the authors keep the top-left 28x28
  (``output[:, :, :-2, :-2]``), as :class:`ResNetGenerator` does.
* **Discriminator.** Stride-2 convolutions with ReLU (the paper's: 5x5, 64, 128, 256
  channels, 28 -> 14 -> 7 -> 4), flattened to ``h``; the score is
  ``linear(h) + <embed(y), h>``, the projection discriminator of Miyato & Koyama (2018,
  arXiv:1802.05637). Scores have shape ``(B,)``, as the authors' ``out.view(-1)``.

Every convolution, linear and embedding, in both models, is spectrally normalized
(:func:`torch.nn.utils.parametrizations.spectral_norm`, one power iteration per forward
in training mode, as the authors' ``SpectralNorm``). Nothing mixes samples: no
BatchNorm, because WGAN-GP's gradient penalty and the gradient sanitizer, which clips
each fake image's gradient, both need sample ``i``'s score to depend on image ``i``
alone.

The ``small_*`` pair is the same design sized for 1x8x8 digits on a CPU: 2x2 -> 8x8 in
two blocks, a padded output conv (no crop) and two 3x3 discriminator convs (8 -> 4 -> 2).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

PIXEL_NORM_EPS = 1e-10  # the authors' ops.pixel_norm


def sample_latent(n: int, latent_dim: int, generator: torch.Generator) -> Tensor:
    """Draw ``n`` latent codes in {0, 1}^latent_dim, each coordinate Bernoulli(1/2).

    Parameters
    ----------
    n, latent_dim
        Shape of the draw.
    generator
        Source of randomness; the codes are on its device.

    Returns
    -------
    Tensor
        ``(n, latent_dim)`` float32 zeros and ones.
    """
    half = torch.full((n, latent_dim), 0.5, device=generator.device)
    return torch.bernoulli(half, generator=generator)


def pixel_norm(x: Tensor, eps: float = PIXEL_NORM_EPS) -> Tensor:
    """Scale each pixel's feature vector to unit mean square over channels (dim 1).

    Karras et al. (2018, arXiv:1710.10196): ``x / sqrt(mean_c x_c^2 + eps)``.
    """
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


class ResidualUpBlock(nn.Module):
    """Residual block that doubles the side of a ``channels``-channel map.

    Parameters
    ----------
    channels
        Input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(channels, channels, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(channels, channels, 3, padding=1))
        self.shortcut = spectral_norm(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C, H, W)`` to ``(B, C, 2H, 2W)``."""
        h = F.interpolate(pixel_norm(x), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(pixel_norm(self.conv1(h))))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResNetGenerator(nn.Module):
    """Class-conditional generator: ``(z, labels) -> images`` in [0, 1].

    Parameters
    ----------
    image_shape
        ``(C, H, W)`` of the images it makes.
    num_classes
        Number of labels (the one-hot's length).
    latent_dim
        Length of ``z``.
    width
        Channels of every block.
    start_size
        Side of the map the linear layer makes; each block doubles it.
    num_blocks
        Residual up-blocks.
    final_padding
        Padding of the output conv3x3; ``start_size * 2**num_blocks + 2 * final_padding - 2``
        must be at least ``H`` and ``W``, and the top-left ``H x W`` is kept.
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, ...],
        num_classes: int,
        latent_dim: int,
        width: int,
        start_size: int,
        num_blocks: int,
        final_padding: int,
    ) -> None:
        super().__init__()
        channels, height, wide = image_shape
        side = start_size * 2**num_blocks + 2 * final_padding - 2
        if side < max(height, wide):
            raise ValueError(f"generator makes {side}x{side} maps, too small for {image_shape}")
        self.image_shape = (channels, height, wide)
        self.num_classes, self.latent_dim = num_classes, latent_dim
        self.width, self.start_size = width, start_size
        self.fc = spectral_norm(nn.Linear(latent_dim + num_classes, width * start_size**2))
        self.blocks = nn.Sequential(*(ResidualUpBlock(width) for _ in range(num_blocks)))
        self.output = spectral_norm(nn.Conv2d(width, channels, 3, padding=final_padding))

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        """Map ``z`` ``(B, latent_dim)`` and int64 ``labels`` ``(B,)`` to ``(B, C, H, W)``."""
        one_hot = F.one_hot(labels, self.num_classes).to(z.dtype)
        h = self.fc(torch.cat([z, one_hot], dim=1))
        h = h.view(-1, self.width, self.start_size, self.start_size)  # (B, width, s, s)
        h = self.blocks(pixel_norm(F.relu(h)))
        images = torch.sigmoid(self.output(h))
        _, height, wide = self.image_shape
        return images[:, :, :height, :wide]  # the authors' crop: top-left, 30x30 -> 28x28


class ProjectionDiscriminator(nn.Module):
    """Conditional critic ``(images, labels) -> scores`` of shape ``(B,)``.

    Parameters
    ----------
    image_shape
        ``(C, H, W)`` of its inputs.
    num_classes
        Number of labels (rows of the projection embedding).
    channels
        Output channels of the stride-2 convolutions, one per layer.
    kernel_size
        Odd side of every conv kernel; padding ``kernel_size // 2`` makes each layer map a
        side ``n`` to ``ceil(n / 2)``.
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, ...],
        num_classes: int,
        channels: tuple[int, ...],
        kernel_size: int,
    ) -> None:
        super().__init__()
        in_channels, height, wide = image_shape
        layers: list[nn.Module] = []
        for out_channels in channels:
            conv = nn.Conv2d(in_channels, out_channels, kernel_size, 2, kernel_size // 2)
            layers += [spectral_norm(conv), nn.ReLU()]
            # (n + 2 * (k // 2) - k) // 2 + 1 = ceil(n / 2) for odd k
            in_channels, height, wide = out_channels, (height + 1) // 2, (wide + 1) // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        features = in_channels * height * wide
        self.linear = spectral_norm(nn.Linear(features, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, features))

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Score ``images`` ``(B, C, H, W)`` given int64 ``labels`` ``(B,)``: ``(B,)``."""
        h = self.features(images)  # (B, features)
        return self.linear(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)


def paper_generator(
    input_shape: tuple[int, ...], num_classes: int, *, latent_dim: int = 10, width: int = 256
) -> ResNetGenerator:
    """Build the paper's generator for ``(C, 28, 28)`` images: 4x4 -> 32x32, cropped to 28x28."""
    shape = _checked("paper_generator", input_shape, 28, "small_generator", num_classes)
    _check_positive("paper_generator", latent_dim=latent_dim, width=width)
    return ResNetGenerator(
        image_shape=shape, num_classes=num_classes, latent_dim=latent_dim, width=width,
        start_size=4, num_blocks=3, final_padding=0,
    )  # fmt: skip


def small_generator(
    input_shape: tuple[int, ...], num_classes: int, *, latent_dim: int = 10, width: int = 64
) -> ResNetGenerator:
    """Build the CPU-sized generator for ``(C, 8, 8)`` images: 2x2 -> 8x8, no crop."""
    shape = _checked("small_generator", input_shape, 8, "paper_generator", num_classes)
    _check_positive("small_generator", latent_dim=latent_dim, width=width)
    return ResNetGenerator(
        image_shape=shape, num_classes=num_classes, latent_dim=latent_dim, width=width,
        start_size=2, num_blocks=2, final_padding=1,
    )  # fmt: skip


def paper_discriminator(input_shape: tuple[int, ...], num_classes: int) -> ProjectionDiscriminator:
    """Build the paper's discriminator for ``(C, 28, 28)`` images: 5x5 convs, 64/128/256."""
    shape = _checked("paper_discriminator", input_shape, 28, "small_discriminator", num_classes)
    return ProjectionDiscriminator(
        image_shape=shape, num_classes=num_classes, channels=(64, 128, 256), kernel_size=5
    )


def small_discriminator(
    input_shape: tuple[int, ...], num_classes: int, *, width: int = 32
) -> ProjectionDiscriminator:
    """Build the CPU-sized discriminator for ``(C, 8, 8)`` images: 3x3 convs, width/2*width."""
    shape = _checked("small_discriminator", input_shape, 8, "paper_discriminator", num_classes)
    _check_positive("small_discriminator", width=width)
    return ProjectionDiscriminator(
        image_shape=shape, num_classes=num_classes, channels=(width, 2 * width), kernel_size=3
    )


def _checked(
    name: str, input_shape: tuple[int, ...], side: int, other: str, num_classes: int
) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[1:] != (side, side) or shape[0] < 1:
        raise ValueError(
            f"{name} needs input_shape (C, {side}, {side}), got {shape}; "
            f"use {other} for the other image size"
        )
    _check_positive(name, num_classes=num_classes)
    return shape[0], shape[1], shape[2]


def _check_positive(name: str, **values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"{name} needs {key} >= 1, got {value}")
