"""Compressed nn.Linear: input (B, ..., I), every dim a mode, the last one the fan-in."""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..core.linear import TuckerLinearFunction, tucker_linear_grad_weight
from .base import CompressedLayer
from .registry import register_compressed_layer


@register_compressed_layer(nn.Linear)
class CompressedLinear(CompressedLayer, nn.Linear):
    """nn.Linear whose backward keeps only a Tucker core of its input."""

    plain_type = nn.Linear

    def _check_method(self) -> None:
        if self.compressor.name == "gradient_filter":
            raise ValueError(f"layer {self.layer_name!r}: gradient_filter pools R x R spatial patches "
                             f"and applies to Conv2d only; choose lance, asi, hosvd or vanilla for "
                             f"Linear layers (or select only Conv2d layers)")

    def plain_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def compressed_forward(self, x: Tensor, factors: list[Optional[Tensor]]) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"layer {self.layer_name!r} expects inputs (..., {self.in_features}), "
                             f"got {tuple(x.shape)}")
        out, _ = TuckerLinearFunction.apply(x, self.weight, self.bias, *factors)
        return out

    def grad_weight_from(self, core: Tensor, factors: Sequence[Optional[Tensor]],
                         grad_output: Tensor) -> Tensor:
        return tucker_linear_grad_weight(core, factors, grad_output)
