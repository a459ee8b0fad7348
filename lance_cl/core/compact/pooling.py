"""Max pooling that saves the in-window position of each maximum (uint8) instead of its input
and int64 indices.

Plain ``max_pool2d`` saves its input x (B, C, H, W) and int64 flat indices of the maxima. The
backward only needs the indices; each one is determined by the output position and the offset
inside its window, kh * kw <= 256 values for every common pool, so one byte per output suffices
(int16 / int32 for larger windows). The backward rebuilds the flat indices and scatter-adds
grad_output, which is exactly what PyTorch's own backward does (overlapping windows add up).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _offset_dtype(window: int) -> torch.dtype:
    if window <= 256:
        return torch.uint8
    return torch.int16 if window <= 2 ** 15 else torch.int32


def _window_origins(out_size: int, stride: int, padding: int, device) -> Tensor:
    return torch.arange(out_size, device=device) * stride - padding


def flat_indices_to_offsets(indices: Tensor, in_w: int, kernel: Sequence[int], stride: Sequence[int],
                            padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """indices: (B, C, Ho, Wo) int64 flat positions in an (H, W) plane -> in-window offsets
    ``ki * kw + kj`` (the maximum sits at row origin_h + ki * dh, column origin_w + kj * dw)."""
    ho, wo = indices.shape[-2:]
    rows, cols = indices // in_w, indices % in_w
    oh = _window_origins(ho, stride[0], padding[0], indices.device).view(ho, 1)
    ow = _window_origins(wo, stride[1], padding[1], indices.device).view(1, wo)
    ki = (rows - oh) // dilation[0]
    kj = (cols - ow) // dilation[1]
    return (ki * kernel[1] + kj).to(_offset_dtype(kernel[0] * kernel[1]))


def offsets_to_flat_indices(offsets: Tensor, in_w: int, kernel: Sequence[int], stride: Sequence[int],
                            padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """Inverse of :func:`flat_indices_to_offsets`: (B, C, Ho, Wo) offsets -> int64 flat indices."""
    ho, wo = offsets.shape[-2:]
    off = offsets.long()
    oh = _window_origins(ho, stride[0], padding[0], offsets.device).view(ho, 1)
    ow = _window_origins(wo, stride[1], padding[1], offsets.device).view(1, wo)
    rows = oh + (off // kernel[1]) * dilation[0]
    cols = ow + (off % kernel[1]) * dilation[1]
    return rows * in_w + cols


class CompactMaxPool2dFunction(torch.autograd.Function):
    """max_pool2d(x). x: (B, C, H, W) -> y: (B, C, Ho, Wo); saves offsets (B, C, Ho, Wo) uint8."""

    @staticmethod
    def forward(x: Tensor, kernel, stride, padding, dilation, ceil_mode: bool):
        y, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        return y, flat_indices_to_offsets(idx, x.shape[-1], kernel, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, kernel, stride, padding, dilation, _ = inputs
        _, offsets = output
        ctx.mark_non_differentiable(offsets)
        ctx.save_for_backward(offsets)
        ctx.geometry = (kernel, stride, padding, dilation)
        ctx.x_shape = x.shape

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor, _grad_offsets):
        (offsets,) = ctx.saved_tensors
        b, c, h, w = ctx.x_shape
        idx = offsets_to_flat_indices(offsets, w, *ctx.geometry)
        grad = grad_output.new_zeros(b * c, h * w)
        grad.scatter_add_(1, idx.reshape(b * c, -1), grad_output.reshape(b * c, -1))
        return grad.view(b, c, h, w), None, None, None, None, None


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def compact_max_pool2d(x: Tensor, kernel_size, stride=None, padding=0, dilation=1,
                       ceil_mode: bool = False) -> Tensor:
    """``F.max_pool2d`` with compact saved state. x: (B, C, H, W) or (C, H, W)."""
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"max_pool2d expects (B, C, H, W) or (C, H, W) inputs, got {tuple(x.shape)}")
    kernel = _pair(kernel_size)
    stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
    y, _ = CompactMaxPool2dFunction.apply(x, kernel, stride, _pair(padding), _pair(dilation),
                                          bool(ceil_mode))
    return y.squeeze(0) if unbatched else y
