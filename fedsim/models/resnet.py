"""ResNet-18 with GroupNorm in place of BatchNorm, as federated-learning papers use it.

He et al. (CVPR 2016, arXiv 1512.03385) in its CIFAR form: a 3x3 stem without max
pooling, four stages of two basic blocks (64, 128, 256, 512 channels; stride 2 from the
second stage on), global average pooling and a linear layer. Hsieh et al. (ICML 2020,
"The Non-IID Data Quagmire of Decentralized Machine Learning", arXiv 1910.00189) show
that BatchNorm's running statistics, averaged across clients whose data differ, do not
describe any client's data, and that GroupNorm (Wu & He 2018), which normalizes each
sample over groups of channels, recovers the lost accuracy. GroupNorm keeps no running
statistics, so the model has no buffers and the multi-exchange strategies take it.
``groups`` (channels per layer divided into this many groups) defaults to 2.
"""

from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812 (PyTorch's own convention)

from fedsim.models.small import image_shape


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm, plus the identity (or a 1x1 projection)."""

    def __init__(self, inputs: int, outputs: int, *, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False),
                nn.GroupNorm(groups, outputs),
            )

    def forward(self, x: Tensor) -> Tensor:
        """``relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))``."""
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def resnet18_gn(
    input_shape: tuple[int, ...], num_classes: int, *, groups: int = 2, width: int = 64
) -> nn.Module:
    """ResNet-18 (11.2 million parameters at ``width`` 64 on CIFAR-10) with GroupNorm."""
    channels, _, _ = image_shape("resnet18-gn", input_shape, smallest=1)
    widths = (width, 2 * width, 4 * width, 8 * width)
    layers: list[nn.Module] = [
        nn.Conv2d(channels, width, 3, padding=1, bias=False),
        nn.GroupNorm(groups, width),
        nn.ReLU(),
    ]
    inputs = width
    for stage, outputs in enumerate(widths):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(inputs, outputs, stride=stride, groups=groups))
            inputs = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, num_classes)]
    return nn.Sequential(*layers)
