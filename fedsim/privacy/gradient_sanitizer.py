"""GS-WGAN's sanitizer: clip each sample's gradient at the generated image, add Gaussian noise.

Chen, Orekondy & Fritz, "GS-WGAN: A Gradient-Sanitized Approach for Learning
Differentially Private Generators", NeurIPS 2020. The generator learns from
private data only through g_i = dL_G/dx~_i, the gradient of the generator loss at
each of the B generated images (it carries the 1/B of the loss's mean). Each g_i
is clipped to L2 norm C/B and Gaussian noise of standard deviation 2 C sigma / B
is added per coordinate: replacing one of a discriminator's records can move a
clipped g_i anywhere in a ball of radius C/B, so its sensitivity is 2C/B and the
noise multiplier is sigma.

With sigma = 0 this only clips (rows under the bound are returned unchanged). The
authors' code instead *normalizes* every row to norm C/B when sigma = 0; fedsim
does not, so a run without noise is the clipped, not the normalized, generator.
"""

import torch
from torch import Tensor


def sanitize(
    gradients: Tensor, *, clip_norm: float, noise_multiplier: float, generator: torch.Generator
) -> Tensor:
    """Return ``gradients`` (B rows, one per generated sample) clipped to C/B and noised.

    Each row is scaled by ``min(1, (C/B) / ||g_i||)``; then N(0, (2 C sigma / B)^2)
    is added to every coordinate, drawn from ``generator`` (CPU) so that a seed
    fixes it on every device.
    """
    if gradients.ndim < 1 or gradients.shape[0] < 1:
        raise ValueError(
            f"gradients must hold one row per sample, got shape {tuple(gradients.shape)}"
        )
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    batch = gradients.shape[0]
    bound = clip_norm / batch
    norms = gradients.flatten(1).norm(dim=1)
    scale = torch.clamp(bound / norms.clamp_min(torch.finfo(norms.dtype).tiny), max=1.0)
    clipped = gradients * scale.view(-1, *([1] * (gradients.ndim - 1)))
    if noise_multiplier == 0:
        return clipped
    noise = torch.randn(gradients.shape, generator=generator, dtype=gradients.dtype)
    return clipped + noise.to(gradients.device) * (2 * clip_norm * noise_multiplier / batch)
