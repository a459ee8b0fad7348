"""ReLU, ReLU6, Hardtanh and LeakyReLU saving a 1-bit mask."""
from __future__ import annotations

from torch import Tensor, nn

from ...core.compact import masked_activation
from .base import CompactModule, needs_saving, register_compact_module

_INF = float("inf")


class _MaskedActivation(CompactModule):
    kind = "activation"

    def saves(self) -> str:
        return "1-bit mask"


@register_compact_module(nn.ReLU)
class CompactReLU(_MaskedActivation, nn.ReLU):
    def forward(self, x: Tensor) -> Tensor:
        if not needs_saving(x):
            return nn.ReLU.forward(self, x)
        return masked_activation(x, "hardtanh", 0.0, _INF, self.inplace)


@register_compact_module(nn.ReLU6)
class CompactReLU6(_MaskedActivation, nn.ReLU6):
    def forward(self, x: Tensor) -> Tensor:
        if not needs_saving(x):
            return nn.ReLU6.forward(self, x)
        return masked_activation(x, "hardtanh", 0.0, 6.0, self.inplace)


@register_compact_module(nn.Hardtanh)
class CompactHardtanh(_MaskedActivation, nn.Hardtanh):
    def forward(self, x: Tensor) -> Tensor:
        if not needs_saving(x):
            return nn.Hardtanh.forward(self, x)
        return masked_activation(x, "hardtanh", self.min_val, self.max_val, self.inplace)


@register_compact_module(nn.LeakyReLU)
class CompactLeakyReLU(_MaskedActivation, nn.LeakyReLU):
    def forward(self, x: Tensor) -> Tensor:
        if not needs_saving(x) or self.negative_slope < 0:
            return nn.LeakyReLU.forward(self, x)
        return masked_activation(x, "leaky_relu", self.negative_slope, 0.0, self.inplace)
