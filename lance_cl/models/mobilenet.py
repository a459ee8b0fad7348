"""A small MobileNetV2-style network: a test bed for grouped / depthwise convolutions."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["InvertedResidual", "MobileNetV2Blocks"]


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=False))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear project, with a skip when shapes match.

    ``dw_multiplier`` > 1 makes the 3x3 conv a depthwise conv with a channel multiplier
    (out = multiplier * in, groups = in). ``expansion == 1`` skips the expand conv.
    x: (B, in_channels, H, W) -> (B, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, expansion: int = 6, dw_multiplier: int = 1
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.expand = _conv_bn(in_channels, hidden, 1) if expansion != 1 else nn.Identity()
        self.depthwise = _conv_bn(hidden, hidden * dw_multiplier, 3, stride=stride, groups=hidden)
        self.project = _conv_bn(hidden * dw_multiplier, out_channels, 1, act=False)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.use_residual else y


class MobileNetV2Blocks(nn.Module):
    """Stem (3x3, stride 2) + inverted-residual stages + global average pool + Linear head.

    Stage i (i >= 1) moves to ``widths[i]`` with a stride-2 block, then adds one stride-1
    residual block; the first stage is a single expansion-1 residual block at ``widths[0]``.
    The stride-2 block of the second stage uses a depthwise channel multiplier of 2.
    x: (B, in_channels, 32, 32) -> logits (B, n_classes); any H, W >= 2**len(widths) works.
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 10,
        widths: Sequence[int] = (16, 24, 32, 64),
        expansion: int = 6,
    ) -> None:
        super().__init__()
        widths = list(widths)
        if not widths:
            raise ValueError("widths must not be empty")
        self.stem = _conv_bn(in_channels, widths[0], 3, stride=2)
        blocks: list[nn.Module] = [InvertedResidual(widths[0], widths[0], 1, expansion=1)]
        for i in range(1, len(widths)):
            blocks.append(
                InvertedResidual(widths[i - 1], widths[i], 2, expansion, dw_multiplier=2 if i == 2 else 1)
            )
            blocks.append(InvertedResidual(widths[i], widths[i], 1, expansion))
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], n_classes)

    def features(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, H, W) -> (B, widths[-1])."""
        return self.pool(self.blocks(self.stem(x))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, H, W) -> (B, n_classes)."""
        return self.head(self.features(x))
