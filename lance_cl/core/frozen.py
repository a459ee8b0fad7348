"""Conv2d and Linear with a frozen weight: autograd Functions that save only the weight.

PyTorch's convolution and linear nodes keep their input for the backward pass even when the
weight needs no gradient, though grad_input only needs the weight: conv2d's is the transposed
convolution of grad_output with W, linear's is grad_output @ W. These Functions save the weight
alone and return the exact grad_input (and grad_bias when the bias is trained). Under autocast
the backward runs in grad_output's precision, as autocast's own backward does.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.grad import conv2d_input
from torch.nn.modules.utils import _pair

__all__ = ["frozen_conv2d", "frozen_linear", "FrozenConv2dFunction", "FrozenLinearFunction"]

IntPair = Union[int, tuple[int, int]]


class FrozenConv2dFunction(torch.autograd.Function):
    """(x (B, C_in, H, W), weight (C_out, C_in/groups, kh, kw), bias (C_out,) or None, stride,
    padding (symmetric pair), dilation, groups) -> F.conv2d output; saves only the weight."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, stride, padding, dilation, groups)
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.geometry
        x_dtype, bias_dtype = ctx.dtypes
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input(shape, weight.to(grad_output.dtype), grad_output, stride,
                                  padding, dilation, groups).to(x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum((0, 2, 3)).to(bias_dtype)
        return grad_x, None, grad_bias, None, None, None, None


class FrozenLinearFunction(torch.autograd.Function):
    """(x (..., I), weight (O, I), bias (O,) or None) -> F.linear output; saves only the weight."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(weight)
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (weight,) = ctx.saved_tensors
        x_dtype, bias_dtype = ctx.dtypes
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_output @ weight.to(grad_output.dtype)).to(x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(bias_dtype)
        return grad_x, None, grad_bias


def _needs_graph(x: Tensor, weight: Tensor, bias: Optional[Tensor], what: str) -> bool:
    """True when autograd would record the call; refuses a weight that needs its gradient."""
    if not torch.is_grad_enabled():
        return False
    if weight.requires_grad:
        raise ValueError(f"{what}: the weight requires grad; frozen layers compute no weight "
                         f"gradient (use F.{what.removeprefix('frozen_')} for trained weights)")
    return x.requires_grad or (bias is not None and bias.requires_grad)


def _symmetric_padding(x: Tensor, weight: Tensor, padding: Union[str, IntPair],
                       stride: tuple[int, int],
                       dilation: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """'valid' / 'same' / int / pair -> (x, symmetric pair); odd 'same' totals pad x itself."""
    if not isinstance(padding, str):
        return x, _pair(padding)
    if padding == "valid":
        return x, (0, 0)
    if padding != "same":
        raise ValueError(f"padding={padding!r}: use an int, a pair, 'same' or 'valid'")
    if stride != (1, 1):
        raise ValueError("padding='same' is not supported for strided convolutions (as F.conv2d)")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[-2:])]
    if all(t % 2 == 0 for t in total):
        return x, (total[0] // 2, total[1] // 2)
    (th, tw) = total
    return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2)), (0, 0)


def frozen_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                  padding: Union[str, IntPair] = 0, dilation: IntPair = 1,
                  groups: int = 1) -> Tensor:
    """F.conv2d for a weight with requires_grad False that saves only the weight for backward.

    x: (B, C_in, H, W) or (C_in, H, W); weight: (C_out, C_in / groups, kh, kw); bias: (C_out,)
    or None. Output, grad_input and grad_bias are those of F.conv2d.
    """
    if not _needs_graph(x, weight, bias, "frozen_conv2d"):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if x.dim() == 3:
        return frozen_conv2d(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups)[0]
    stride, dilation = _pair(stride), _pair(dilation)
    x, pad = _symmetric_padding(x, weight, padding, stride, dilation)
    return FrozenConv2dFunction.apply(x, weight, bias, stride, pad, dilation, groups)


def frozen_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear for a weight with requires_grad False that saves only the weight for backward.

    x: (..., I); weight: (O, I); bias: (O,) or None -> (..., O).
    """
    if not _needs_graph(x, weight, bias, "frozen_linear"):
        return F.linear(x, weight, bias)
    return FrozenLinearFunction.apply(x, weight, bias)
