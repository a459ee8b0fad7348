"""Compressed nn.Conv2d: every stride, padding ('same', asymmetric, non-zero modes), dilation and
groups; tensor layout (B, C, H, W) or patch layout (B, C*kh*kw, L)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..core.conv2d import (LAYOUTS, ConvSpec, GradientFilterConv2dFunction, TuckerConv2dFunction,
                           layout_shape, layout_view, tucker_conv2d_grad_weight)
from .base import CompressedLayer
from .registry import register_compressed_layer


@register_compressed_layer(nn.Conv2d)
class CompressedConv2d(CompressedLayer, nn.Conv2d):
    """nn.Conv2d whose backward keeps only a Tucker core (or R x R block means) of its input."""

    plain_type = nn.Conv2d

    def _layer_options(self, options: dict) -> dict:
        return {"layout": options.pop("layout", "tensor")}

    def _setup(self, layout: str = "tensor") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layer {self.layer_name!r}: layout={layout!r}; choose one of {LAYOUTS}")
        self.layout = layout
        self.conv_spec = ConvSpec.build(self.kernel_size, self.stride, self.padding, self.dilation,
                                        self.groups, self.padding_mode)

    def _check_method(self) -> None:
        if self.compressor.name == "gradient_filter" and self.layout != "tensor":
            raise ValueError(f"layer {self.layer_name!r}: gradient_filter works on the tensor layout; "
                             f"drop layout='patch'")

    def activation_modes(self) -> int:
        return 4 if self.layout == "tensor" else 3

    def prepare_input(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"layer {self.layer_name!r} expects inputs (B, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        return self.conv_spec.apply_pre_pad(x)

    def activation_view(self, x: Tensor) -> Tensor:
        return layout_view(x, self.kernel_size, self.conv_spec, self.layout)

    def view_shape(self, x: Tensor) -> Sequence[int]:
        return layout_shape(x.shape, self.kernel_size, self.conv_spec, self.layout)

    def plain_forward(self, x: Tensor) -> Tensor:
        s = self.conv_spec
        return F.conv2d(x, self.weight, self.bias, s.stride, s.padding, s.dilation, s.groups)

    def compressed_forward(self, x: Tensor, factors: list[Optional[Tensor]]) -> Tensor:
        if self.compressor.name == "gradient_filter":
            out, _ = GradientFilterConv2dFunction.apply(x, self.weight, self.bias, self.conv_spec,
                                                        self.compressor.radius)
            return out
        out, _ = TuckerConv2dFunction.apply(x, self.weight, self.bias, self.conv_spec, self.layout,
                                            *factors)
        return out

    def grad_weight_from(self, core: Tensor, factors: Sequence[Optional[Tensor]],
                         grad_output: Tensor) -> Tensor:
        return tucker_conv2d_grad_weight(core, factors, grad_output, self.weight.shape,
                                         self.conv_spec, self.layout)
