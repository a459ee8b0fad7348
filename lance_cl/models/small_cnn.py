"""A small multi-head CNN for 8x8 (scikit-learn digits) and 28x28 (MNIST-like) inputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .heads import MultiHeadModule

__all__ = ["SmallCNN"]


class SmallCNN(MultiHeadModule):
    """conv3x3 -> BN -> ReLU -> pool2 -> conv3x3 -> BN -> ReLU -> pool2 -> FC -> BN -> ReLU -> heads.

    Convs use padding 1, so the spatial size is ``input_size // 2 // 2`` after the two pools
    (8 -> 2, 28 -> 7). No layer has a bias and BatchNorm keeps no running statistics, as in
    AlexNet5, so gradient-projection methods protect every shared parameter except BN's affine.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int | Sequence[int] = 2,
        n_tasks: int = 1,
        input_size: int = 28,
        *,
        widths: tuple[int, int] = (16, 32),
        hidden: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        s = input_size // 2 // 2
        if s < 1:
            raise ValueError(f"input_size={input_size} is too small (needs >= 4)")
        c1, c2 = widths
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1, track_running_stats=False)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2, track_running_stats=False)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.flat_features = c2 * s * s
        self.fc1 = nn.Linear(self.flat_features, hidden, bias=False)
        self.bn3 = nn.BatchNorm1d(hidden, track_running_stats=False)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._make_heads(hidden, n_tasks, n_classes)

    segment_chains = {"stem": ("conv1", "bn1", "relu", "pool")}

    def stem(self, x: Tensor) -> Tensor:
        """The first conv block. x: (B, in_channels, s, s) -> (B, widths[0], s // 2, s // 2)."""
        return self.pool(self.relu(self.bn1(self.conv1(x))))

    def features(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, input_size, input_size) -> (B, hidden)."""
        x = self.run_segment("stem", self.stem, x)
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        return self.drop(self.relu(self.bn3(self.fc1(x.flatten(1)))))
