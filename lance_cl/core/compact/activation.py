"""Piecewise-linear activations that save a 1-bit mask instead of a float tensor.

ReLU, ReLU6, Hardtanh and LeakyReLU have a derivative that takes two values, so their backward
needs only where the input lies: grad_input = grad_output * (mask ? 1 : slope_outside), with
slope_outside = 0 (ReLU, ReLU6, Hardtanh) or the negative slope (LeakyReLU). The forward output is
computed by PyTorch's own kernel, so it is bit-identical to the plain module; the mask follows
PyTorch's convention at the kinks (derivative 0 exactly at the thresholds, LeakyReLU's slope at 0).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .bitpack import multiply_by_mask, pack_bits


_NUMPY_COMPARABLE = (torch.float32, torch.float64)


def _compare(x: Tensor, op: str, value: float) -> Tensor:
    """``x > value`` (op "greater") or ``x < value`` ("less") as a bool tensor of x's shape.

    On a CPU, float32 / float64 contiguous tensors are compared by numpy into a tensor PyTorch
    allocates: the same result (numpy, like PyTorch, compares in x's dtype), 2.4x-4.4x faster
    than PyTorch's CPU comparison into bool (docs/memory.md)."""
    if x.device.type == "cpu" and x.dtype in _NUMPY_COMPARABLE and x.is_contiguous():
        out = torch.empty(x.shape, dtype=torch.bool)
        getattr(np, op)(x.detach().numpy(), value, out=out.numpy())
        return out
    return x > value if op == "greater" else x < value


def _forward(x: Tensor, kind: str, a: float, b: float, inplace: bool) -> tuple[Tensor, Tensor]:
    """(output, mask of the region where the derivative is 1), computed before any in-place write."""
    if kind == "leaky_relu":
        mask = _compare(x, "greater", 0.0)
        y = F.leaky_relu(x, a, inplace=inplace)
    elif b == float("inf"):  # hardtanh family: relu is (0, inf), relu6 is (0, 6)
        mask = _compare(x, "greater", a)
        y = F.relu(x, inplace=inplace) if a == 0.0 else F.hardtanh(x, a, b, inplace=inplace)
    else:
        mask = _compare(x, "greater", a).logical_and_(_compare(x, "less", b))
        y = F.hardtanh(x, a, b, inplace=inplace)
    return y, mask


class MaskedActivationFunction(torch.autograd.Function):
    """y = act(x) saving ``pack_bits(mask)`` only. ``kind``: "hardtanh" with bounds (a, b)
    (ReLU: (0, inf), ReLU6: (0, 6)) or "leaky_relu" with negative slope a.
    x: any shape -> y: same shape."""

    @staticmethod
    def forward(x: Tensor, kind: str, a: float, b: float, inplace: bool) -> Tensor:
        y, mask = _forward(x, kind, a, b, inplace)
        return y, pack_bits(mask)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, kind, a, _, inplace = inputs
        _, packed = output
        if inplace:
            ctx.mark_dirty(x)
        ctx.mark_non_differentiable(packed)
        ctx.save_for_backward(packed)
        ctx.shape = x.shape
        ctx.slope_outside = a if kind == "leaky_relu" else 0.0

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor, _grad_packed):
        (packed,) = ctx.saved_tensors
        grad = multiply_by_mask(grad_output, packed, ctx.shape, 1.0, ctx.slope_outside)
        return grad, None, None, None, None


def masked_activation(x: Tensor, kind: str, a: float = 0.0, b: float = float("inf"),
                      inplace: bool = False) -> Tensor:
    """Functional form of :class:`MaskedActivationFunction`. x: any shape."""
    if kind not in ("hardtanh", "leaky_relu"):
        raise ValueError(f"kind={kind!r}: choose 'hardtanh' or 'leaky_relu'")
    if kind == "leaky_relu" and a < 0:
        raise ValueError(f"negative_slope={a} < 0: the 1-bit mask assumes a monotone activation")
    y, _ = MaskedActivationFunction.apply(x, kind, float(a), float(b), bool(inplace))
    return y
