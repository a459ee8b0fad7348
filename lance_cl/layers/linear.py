"""Compressed nn.Linear: input (B, ..., I), every dim a mode, the last one the fan-in."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..core.frozen import frozen_linear
from ..core.linear import TuckerLinearFunction, tucker_linear_grad_weight
from ..core.tucker import projection_macs
from .base import CompressedLayer
from .registry import register_compressed_layer


@register_compressed_layer(nn.Linear)
class CompressedLinear(CompressedLayer, nn.Linear):
    """nn.Linear whose backward keeps only a Tucker core of its input."""

    plain_type = nn.Linear

    def plain_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def frozen_forward(self, x: Tensor) -> Tensor:
        return frozen_linear(x, self.weight, self.bias)

    def tucker_forward(self, x: Tensor, factors: list[Optional[Tensor]]) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"layer {self.layer_name!r} expects inputs (..., {self.in_features}), "
                             f"got {tuple(x.shape)}")
        out, _ = TuckerLinearFunction.apply(x, self.weight, self.bias, *factors)
        return out

    def grad_weight_from(self, core: Tensor, factors: Sequence[Optional[Tensor]],
                         grad_output: Tensor) -> Tensor:
        return tucker_linear_grad_weight(core, factors, grad_output)

    @staticmethod
    def prepared_shape(module: nn.Linear, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape)

    @staticmethod
    def dense_macs(module: nn.Module, shape: Sequence[int]) -> int:
        return math.prod(shape[:-1]) * module.in_features * module.out_features

    def tucker_macs(self, shape: Sequence[int], ranks: Sequence[Optional[int]]) -> tuple[int, int]:
        o, i = self.out_features, self.in_features
        projection, core = projection_macs(shape, ranks)
        # grad_output projected on the leading factors, contracted with the core, then lifted
        gy_proj, gy_core = projection_macs(tuple(shape[:-1]) + (o,), list(ranks[:-1]) + [None])
        grad_w = gy_proj + math.prod(gy_core[:-1]) * o * core[-1]
        grad_w += o * core[-1] * i if ranks[-1] is not None else 0
        return grad_w, projection
