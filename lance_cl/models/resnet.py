"""The reduced ResNet-18 (nf=20) of GEM / GPM / TRGP, multi-head, for 32x32 and 84x84 inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .heads import MultiHeadModule

__all__ = ["BasicBlock", "ReducedResNet18", "conv_out_size"]


def conv_out_size(size: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> int:
    """Spatial size after a convolution (floor rule of ``nn.Conv2d``, dilation 1)."""
    return (size + 2 * padding - kernel) // stride + 1


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=False)


class BasicBlock(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU.

    The shortcut is the identity when the shape is kept, else a 1x1 conv (same stride) + BN.
    x: (B, in_channels, H, W) -> (B, out_channels, conv_out_size(H, 3, stride), ...).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = _bn(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), _bn(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ReducedResNet18(MultiHeadModule):
    """Reduced ResNet-18: 3x3 stem, 4 stages of 2 BasicBlocks (nf, 2nf, 4nf, 8nf), heads.

    With nf=20 the 8 blocks have widths 20, 20, 40, 40, 80, 80, 160, 160; stage strides are
    1, 2, 2, 2. ``stem_stride`` is 1 for 32x32 inputs (5-Datasets) and 2 for 84x84
    (MiniImageNet). BatchNorm keeps no running statistics, no layer has a bias. The last map
    is average-pooled with a 2x2 window and flattened:

    - 32x32, stem 1: 32 -> 32 -> 16 -> 8 -> 4 -> pool 2 -> 160*2*2 = 640 features;
    - 84x84, stem 2: 84 -> 42 -> 42 -> 21 -> 11 -> 6 -> pool 3 -> 160*3*3 = 1440 features.

    x: (B, in_channels, input_size, input_size) -> logits (B, n_classes[task]).
    """

    def __init__(
        self,
        n_tasks: int = 1,
        n_classes: int | Sequence[int] = 10,
        in_channels: int = 3,
        *,
        nf: int = 20,
        stem_stride: int = 1,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, nf, 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = _bn(nf)
        self.relu = nn.ReLU()
        widths = [nf, 2 * nf, 4 * nf, 8 * nf]
        strides = [1, 2, 2, 2]
        stages: list[nn.Module] = []
        cin = nf
        size = conv_out_size(input_size, 3, stem_stride)
        for width, stride in zip(widths, strides):
            stages.append(nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)))
            size = conv_out_size(size, 3, stride)
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        pooled = size // 2
        if pooled < 1:
            raise ValueError(f"input_size={input_size} is too small for ReducedResNet18")
        self.final_size = size
        self.flat_features = widths[-1] * pooled * pooled
        self._make_heads(self.flat_features, n_tasks, n_classes)

    segment_chains = {"stem": ("conv1", "bn1", "relu")}

    def stem(self, x: Tensor) -> Tensor:
        """conv1 -> bn1 -> relu on the input batch. x: (B, in_channels, s, s)."""
        return self.relu(self.bn1(self.conv1(x)))

    def features(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, input_size, input_size) -> (B, flat_features)."""
        out = self.run_segment("stem", self.stem, x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.avg_pool2d(out, 2).flatten(1)
