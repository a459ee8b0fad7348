"""MaxPool2d saving uint8 in-window offsets of its maxima."""
from __future__ import annotations

from torch import Tensor, nn

from ...core.compact import compact_max_pool2d, fast_max_pool2d
from .base import CompactModule, needs_saving, register_compact_module


@register_compact_module(nn.MaxPool2d)
class CompactMaxPool2d(CompactModule, nn.MaxPool2d):
    kind = "pooling"

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices:
            return nn.MaxPool2d.forward(self, x)
        if not needs_saving(x):
            return fast_max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                   self.ceil_mode)
        return compact_max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                  self.ceil_mode)

    def saves(self) -> str:
        return "input and int64 indices (return_indices=True)" if self.return_indices \
            else "uint8 window offsets"
