"""In-memory image datasets kept as uint8 and normalised per item (4x less memory than float32)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = ["NormalizedImages"]

Stat = Union[float, Sequence[float]]


class NormalizedImages(TensorDataset):
    """``TensorDataset(images_uint8, labels)`` whose items are ``((x / 255 - mean) / std, y)``.

    images: uint8 (N, C, H, W); labels: int64 (N,); ``mean`` / ``std``: a scalar or C values.
    Being a ``TensorDataset``, Avalanche's generators read the targets from ``tensors[1]``.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: Stat, std: Stat) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        super().__init__(images, labels)
        c = images.shape[1]
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if m.numel() not in (1, c) or s.numel() not in (1, c):
            raise ValueError(f"mean / std need 1 or {c} values, got {m.numel()} and {s.numel()}")
        # fold the 1/255 into the affine map: x * scale + shift
        self.scale = (1.0 / (255.0 * s)).expand(c).reshape(c, 1, 1).clone()
        self.shift = (-m / s).expand(c).reshape(c, 1, 1).clone()

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x, y = self.tensors[0][index], self.tensors[1][index]
        return x.to(torch.float32) * self.scale + self.shift, y

    def normalized(self) -> Tensor:
        """All images normalised at once: float32 (N, C, H, W)."""
        return self.tensors[0].to(torch.float32) * self.scale + self.shift
