"""GPM's AlexNet-5 for 32x32 inputs (Saha et al., ICLR 2021), multi-head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .heads import MultiHeadModule

__all__ = ["AlexNet5"]


def _pooled(size: int, kernel: int) -> int:
    """Spatial size after a valid conv with ``kernel`` then a 2x2 max-pool (floor)."""
    return (size - kernel + 1) // 2


class AlexNet5(MultiHeadModule):
    """Conv 3->64 k4, 64->128 k3, 128->256 k2, FC 1024->2048->2048, one 2048->C head per task.

    Every conv / FC is followed by BatchNorm without running statistics (batch statistics are
    used in eval too, as in GPM), ReLU and dropout (0.2, 0.2, 0.5 for the convs, 0.5 for the
    FCs); convs are also followed by a 2x2 max-pool. No layer has a bias.

    Geometry for 32x32: 32 -k4-> 29 -pool-> 14 -k3-> 12 -pool-> 6 -k2-> 5 -pool-> 2, so the
    flattened feature has 256*2*2 = 1024 entries. ``input_size`` changes this for other sizes.
    """

    def __init__(
        self,
        n_tasks: int = 1,
        n_classes: int | Sequence[int] = 10,
        in_channels: int = 3,
        dropout: bool = True,
        *,
        input_size: int = 32,
    ) -> None:
        super().__init__()

        def drop(p: float) -> nn.Module:
            return nn.Dropout(p) if dropout else nn.Identity()

        self.conv1 = nn.Conv2d(in_channels, 64, 4, bias=False)
        self.bn1 = nn.BatchNorm2d(64, track_running_stats=False)
        self.drop1 = drop(0.2)
        self.conv2 = nn.Conv2d(64, 128, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(128, track_running_stats=False)
        self.drop2 = drop(0.2)
        self.conv3 = nn.Conv2d(128, 256, 2, bias=False)
        self.bn3 = nn.BatchNorm2d(256, track_running_stats=False)
        self.drop3 = drop(0.5)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU(inplace=True)   # BatchNorm's backward never reads its output

        s = input_size
        for k in (4, 3, 2):
            s = _pooled(s, k)
        if s < 1:
            raise ValueError(f"input_size={input_size} is too small for AlexNet5")
        self.flat_features = 256 * s * s

        self.fc1 = nn.Linear(self.flat_features, 2048, bias=False)
        self.bn4 = nn.BatchNorm1d(2048, track_running_stats=False)
        self.drop4 = drop(0.5)
        self.fc2 = nn.Linear(2048, 2048, bias=False)
        self.bn5 = nn.BatchNorm1d(2048, track_running_stats=False)
        self.drop5 = drop(0.5)
        self._make_heads(2048, n_tasks, n_classes)

    segment_chains = {"stem": ("conv1", "bn1", "relu", "drop1", "pool")}

    def stem(self, x: Tensor) -> Tensor:
        """The first conv block. x: (B, in_channels, 32, 32) -> (B, 64, 14, 14)."""
        return self.pool(self.drop1(self.relu(self.bn1(self.conv1(x)))))

    def features(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, 32, 32) -> (B, 2048)."""
        x = self.run_segment("stem", self.stem, x)
        x = self.pool(self.drop2(self.relu(self.bn2(self.conv2(x)))))
        x = self.pool(self.drop3(self.relu(self.bn3(self.conv3(x)))))
        x = x.flatten(1)
        x = self.drop4(self.relu(self.bn4(self.fc1(x))))
        x = self.drop5(self.relu(self.bn5(self.fc2(x))))
        return x
