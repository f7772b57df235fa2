"""A small Transformer classifier over image patches (Dosovitskiy et al., ICLR 2021).

The Vision Transformer's design at a size a CPU trains: non-overlapping ``patch x
patch`` patches embedded linearly (a strided convolution), a learned class token and
learned position embeddings, ``depth`` pre-norm Transformer encoder layers (Vaswani et
al. 2017) and a linear head on the class token. No dropout, so a client's update
depends only on its data and the seeded batch order. LayerNorm keeps no statistics:
the model has no buffers.
"""

import torch
from torch import Tensor, nn

from fedsim.models.small import image_shape


class PatchTransformer(nn.Module):
    """Patch embedding, class token, a Transformer encoder, a linear head."""

    def __init__(
        self, channels: int, tokens: int, num_classes: int, *, patch: int, dim: int,
        depth: int, heads: int,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """Map ``(batch, C, H, W)`` images to ``(batch, num_classes)`` logits."""
        patches = self.embed(images).flatten(2).transpose(1, 2)  # (B, dim, h, w) -> (B, h*w, dim)
        first = self.class_token.expand(len(images), -1, -1)
        encoded = self.encoder(torch.cat([first, patches], dim=1) + self.position)
        return self.head(self.norm(encoded[:, 0]))


def transformer(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    patch: int = 4,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
) -> nn.Module:
    """Build a ``depth``-layer, ``dim``-wide patch Transformer; ``patch`` divides the image."""
    channels, height, width = image_shape("transformer", input_shape, smallest=patch)
    if height % patch or width % patch:
        raise ValueError(
            f"model 'transformer': patch = {patch} must divide the image's {height}x{width}"
        )
    if dim % heads:
        raise ValueError(f"model 'transformer': dim = {dim} must be a multiple of heads = {heads}")
    tokens = (height // patch) * (width // patch)
    return PatchTransformer(
        channels, tokens, num_classes, patch=patch, dim=dim, depth=depth, heads=heads
    )
