"""Compressed nn.Conv2d: every stride, padding ('same', asymmetric, non-zero modes), dilation and
groups; tensor layout (B, C, H, W) or patch layout (B, C*kh*kw, L)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..core.conv2d import (LAYOUTS, ConvSpec, TuckerConv2dFunction, layout_shape, layout_view,
                           tucker_conv2d_grad_weight)
from ..core.frozen import frozen_conv2d
from ..core.tucker import projection_macs
from .base import CompressedLayer
from .registry import register_compressed_layer


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one conv call on a prepared (pre-padded) input (B, C, H, W) -> (B, C_out, H', W')."""

    batch: int
    channels: int
    height: int
    width: int
    out_height: int
    out_width: int
    taps: int              # kh * kw
    out_channels: int
    group_channels: int    # C / groups: the fan-in channels of one output channel

    @property
    def dense_macs(self) -> int:
        """Multiply-adds of the plain conv (also those of grad_input and of grad_weight)."""
        return (self.batch * self.out_channels * self.out_height * self.out_width
                * self.group_channels * self.taps)


def conv_spec_of(module: nn.Conv2d) -> ConvSpec:
    """The layer's :class:`ConvSpec` (a plain nn.Conv2d gets one built from its arguments)."""
    spec = getattr(module, "conv_spec", None)
    if isinstance(spec, ConvSpec):
        return spec
    return ConvSpec.build(module.kernel_size, module.stride, module.padding, module.dilation,
                          module.groups, module.padding_mode)


def conv_geometry(module: nn.Conv2d, shape: Sequence[int]) -> ConvGeometry:
    """Geometry for a prepared input of ``shape`` (B, C, H, W), padding already applied."""
    b, c, h, w = shape
    ho, wo = conv_spec_of(module).output_size(h, w, module.kernel_size)
    return ConvGeometry(b, c, h, w, ho, wo, module.kernel_size[0] * module.kernel_size[1],
                        module.out_channels, c // module.groups)


def patch_view(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Layer input x: (B, C, H, W) -> im2col patches (B, C*kh*kw, L) after the layer's own
    padding (explicit pre-padding included): the fan-in axis of ``weight.view(C_out, -1)`` at
    mode 1."""
    spec = conv_spec_of(module)
    return layout_view(spec.apply_pre_pad(x), module.kernel_size, spec, "patch")


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
        self.conv_spec = conv_spec_of(self)

    def activation_modes(self) -> int:
        return 4 if self.layout == "tensor" else 3

    def prepare_input(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"layer {self.layer_name!r} expects inputs (B, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        return self.conv_spec.apply_pre_pad(x)

    @staticmethod
    def prepared_shape(module: nn.Conv2d, shape: Sequence[int]) -> tuple[int, ...]:
        """Input shape (B, C, H, W) -> the shape after the layer's explicit pre-padding."""
        pre_pad = conv_spec_of(module).pre_pad
        if pre_pad is None:
            return tuple(shape)
        left, right, top, bottom = pre_pad
        b, c, h, w = shape
        return (b, c, h + top + bottom, w + left + right)

    def activation_view(self, x: Tensor) -> Tensor:
        return layout_view(x, self.kernel_size, self.conv_spec, self.layout)

    def view_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return layout_shape(shape, self.kernel_size, self.conv_spec, self.layout)

    def plain_forward(self, x: Tensor) -> Tensor:
        s = self.conv_spec
        return F.conv2d(x, self.weight, self.bias, s.stride, s.padding, s.dilation, s.groups)

    def frozen_forward(self, x: Tensor) -> Tensor:
        s = self.conv_spec                  # x is pre-padded: the spec's padding is symmetric
        return frozen_conv2d(x, self.weight, self.bias, s.stride, s.padding, s.dilation, s.groups)

    def tucker_forward(self, x: Tensor, factors: list[Optional[Tensor]]) -> Tensor:
        out, _ = TuckerConv2dFunction.apply(x, self.weight, self.bias, self.conv_spec, self.layout,
                                            *factors)
        return out

    def grad_weight_from(self, core: Tensor, factors: Sequence[Optional[Tensor]],
                         grad_output: Tensor) -> Tensor:
        return tucker_conv2d_grad_weight(core, factors, grad_output, self.weight.shape,
                                         self.conv_spec, self.layout)

    @staticmethod
    def dense_macs(module: nn.Module, shape: Sequence[int]) -> int:
        return conv_geometry(module, shape).dense_macs

    def tucker_macs(self, shape: Sequence[int], ranks: Sequence[Optional[int]]) -> tuple[int, int]:
        g = conv_geometry(self, shape)
        b, c, h, w, k, c_out = g.batch, g.channels, g.height, g.width, g.taps, g.out_channels
        positions = g.out_height * g.out_width
        if self.layout == "tensor":
            projection, core = projection_macs((b, c, h, w), ranks)
            n, rc = core[0], core[1]
            # grad_output projected on the batch factor, core expanded back over H and W
            grad_w = 0 if ranks[0] is None else ranks[0] * b * c_out * positions
            grad_w += n * rc * h * core[3] * core[2] if ranks[2] is not None else 0
            grad_w += n * rc * h * w * core[3] if ranks[3] is not None else 0
            if ranks[1] is not None and ranks[1] <= g.group_channels:
                # correlation in channel-rank space, then the lift to C channels
                grad_w += n * c_out * positions * rc * k + c_out * g.group_channels * k * rc
            else:
                grad_w += n * c * h * w * rc if ranks[1] is not None else 0
                grad_w += n * c_out * positions * g.group_channels * k
            return grad_w, projection
        # patch layout: the fan-in projection is a conv with U_F^T as kernel
        outer = [ranks[0], None, ranks[2]]
        projection = b * positions * c * k * ranks[1] if ranks[1] is not None else 0
        extra, core = projection_macs([b, ranks[1] or c * k, positions], outer)
        projection += extra
        gy_proj, gy_core = projection_macs((b, c_out, positions), outer)
        grad_w = gy_proj + gy_core[0] * c_out * gy_core[2] * core[1]
        grad_w += c_out * (c * k // self.groups) * ranks[1] if ranks[1] is not None else 0
        return grad_w, projection
