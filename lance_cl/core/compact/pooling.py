"""Max pooling that saves the in-window position of each maximum (uint8) instead of its input
and int64 indices.

Plain ``max_pool2d`` saves its input x (B, C, H, W) and int64 flat indices of the maxima. The
backward needs only where each maximum sits inside its window: kh * kw <= 256 positions for
every common pool, one byte per output (int16 / int32 for larger windows). The forward is
PyTorch's own kernel (so the maxima and the tie-breaking are PyTorch's); its flat index minus the
flat index of the window's origin is ``ki * dh * W + kj * dw``, from which the offset
``ki * kw + kj`` follows with a few comparisons (no integer division, which CPUs do not
vectorise). The backward rebuilds the flat indices with one table look-up and hands them to
PyTorch's own max-pool backward (on a CPU; it reads only the shape of its input argument, so a
zero-stride placeholder stands in for x), or scatter-adds grad_output, which is what that kernel
does (overlapping windows add up), on other devices, whose kernels may copy the input argument.

On a CPU the forward runs PyTorch's kernel on a channels-last copy of x: the same maxima and
indices (the windows are scanned in the same order), 2.5-4x faster than on (B, C, H, W) memory
for AlexNet-5's pools, copy included; the offsets are computed on the channels-last indices and
only the uint8 result is made contiguous (docs/memory.md).
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


def _origins(out_hw: Sequence[int], in_w: int, stride, padding, device) -> Tensor:
    """(Ho, Wo) int64 flat index of each window's top-left corner (may lie in the padding)."""
    rows = torch.arange(out_hw[0], device=device) * stride[0] - padding[0]
    cols = torch.arange(out_hw[1], device=device) * stride[1] - padding[1]
    return rows.view(-1, 1) * in_w + cols.view(1, -1)


def _steps(t: Tensor, step: int, count: int, dtype: torch.dtype) -> Tensor:
    """Number of j in 1..count-1 with t >= j * step: t // step for 0 <= t < count * step."""
    if count == 1:
        return torch.zeros_like(t, dtype=dtype)
    out = (t >= step).to(dtype)                               # t's memory format kept
    for j in range(2, count):
        out += t >= j * step
    return out


def indices_to_offsets(indices: Tensor, in_w: int, kernel, stride, padding, dilation) -> Tensor:
    """indices: (B, C, Ho, Wo) flat positions in an (H, W) plane -> in-window offsets."""
    dtype = _offset_dtype(kernel[0] * kernel[1])
    delta = indices - _origins(indices.shape[-2:], in_w, stride, padding, indices.device)
    row_step = dilation[0] * in_w
    ki = _steps(delta, row_step, kernel[0], dtype)
    col = delta.sub_(ki.long(), alpha=row_step)               # kj * dw
    kj = col.to(dtype) if dilation[1] == 1 else _steps(col, dilation[1], kernel[1], dtype)
    return kj.add_(ki, alpha=kernel[1])


def offsets_to_indices(offsets: Tensor, in_w: int, kernel, stride, padding, dilation) -> Tensor:
    """Inverse of :func:`indices_to_offsets`: (B, C, Ho, Wo) offsets -> int64 flat indices."""
    k = torch.arange(kernel[0] * kernel[1], device=offsets.device)
    shift = (k // kernel[1]) * dilation[0] * in_w + (k % kernel[1]) * dilation[1]
    # index_select with int32 indices: several times faster than advanced indexing on a CPU
    delta = shift.index_select(0, offsets.reshape(-1).int()).view(offsets.shape)
    return delta.add_(_origins(offsets.shape[-2:], in_w, stride, padding, offsets.device))


def _channels_last_on_cpu(x: Tensor) -> Tensor:
    if x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def max_pool2d_with_indices(x: Tensor, kernel, stride, padding, dilation,
                            ceil_mode: bool) -> tuple[Tensor, Tensor]:
    """``F.max_pool2d(..., return_indices=True)``, on a CPU through channels-last memory (the
    same values and indices, faster). x: (B, C, H, W) -> (y contiguous, int64 indices in the
    memory format of the computation: channels-last on a CPU)."""
    y, idx = F.max_pool2d(_channels_last_on_cpu(x), kernel, stride, padding, dilation, ceil_mode,
                          return_indices=True)
    return y.contiguous(), idx


def fast_max_pool2d(x: Tensor, kernel_size, stride=None, padding=0, dilation=1,
                    ceil_mode: bool = False) -> Tensor:
    """``F.max_pool2d`` values (nothing saved for backward when called without grad), through
    channels-last memory on a CPU: the same values, faster. x: (B, C, H, W) or (C, H, W)."""
    return F.max_pool2d(_channels_last_on_cpu(x), kernel_size, stride, padding, dilation,
                        ceil_mode).contiguous()


def _reads_input_shape_only(device: torch.device) -> bool:
    """True where PyTorch's max-pool backward reads only the shape of its input argument (its
    CPU kernel), so that a zero-stride placeholder can stand in for x."""
    return device.type == "cpu"


class CompactMaxPool2dFunction(torch.autograd.Function):
    """max_pool2d(x). x: (B, C, H, W) -> y: (B, C, Ho, Wo); saves offsets (B, C, Ho, Wo) uint8."""

    @staticmethod
    def forward(x: Tensor, kernel, stride, padding, dilation, ceil_mode: bool):
        y, idx = max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        offsets = indices_to_offsets(idx, x.shape[-1], kernel, stride, padding, dilation)
        return y, offsets.contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, kernel, stride, padding, dilation, ceil_mode = inputs
        _, offsets = output
        ctx.mark_non_differentiable(offsets)
        ctx.save_for_backward(offsets)
        ctx.geometry = (kernel, stride, padding, dilation)
        ctx.ceil_mode = ceil_mode
        ctx.x_shape = tuple(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor, _grad_offsets):
        (offsets,) = ctx.saved_tensors
        b, c, h, w = ctx.x_shape
        idx = offsets_to_indices(offsets, w, *ctx.geometry)
        if _reads_input_shape_only(grad_output.device):
            kernel, stride, padding, dilation = ctx.geometry
            shape_only = grad_output.new_empty(1).expand(ctx.x_shape)
            grad = torch.ops.aten.max_pool2d_with_indices_backward(
                grad_output.contiguous(), shape_only, kernel, stride, padding, dilation,
                ctx.ceil_mode, idx)
            return grad, None, None, None, None, None
        grad = grad_output.new_zeros(b * c, h * w)
        grad.scatter_add_(1, idx.reshape(b * c, -1), grad_output.reshape(b * c, -1))
        return grad.view(b, c, h, w), None, None, None, None, None


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def compact_max_pool2d(x: Tensor, kernel_size, stride=None, padding=0, dilation=1,
                       ceil_mode: bool = False) -> Tensor:
    """``F.max_pool2d`` with compact saved state. x: (B, C, H, W) or (C, H, W).

    Where a window reaches a whole row further ((kw - 1) * dw >= dh * W, so two positions of one
    window could share a flat-index difference) the plain op is used.
    """
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"max_pool2d expects (B, C, H, W) or (C, H, W) inputs, got {tuple(x.shape)}")
    kernel = _pair(kernel_size)
    stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
    padding, dilation = _pair(padding), _pair(dilation)
    if (kernel[1] - 1) * dilation[1] >= dilation[0] * x.shape[-1]:
        y = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    else:
        y, _ = CompactMaxPool2dFunction.apply(x, kernel, stride, padding, dilation, bool(ceil_mode))
    return y.squeeze(0) if unbatched else y
