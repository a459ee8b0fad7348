"""Linear with a compressed backward: exact output and grad_input, grad_weight from a Tucker core.

The input x: (B, ..., I) is a tensor whose modes are its dims; the last mode is the fan-in axis
of the weight (O, I). Any subset of modes may be compressed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .tucker import mode_contract, project


def tucker_linear_grad_weight(core: Tensor, factors: Sequence[Optional[Tensor]],
                              grad_output: Tensor) -> Tensor:
    """Exact weight gradient for x_hat = core x_m U_m, without rebuilding x_hat.

    core: (r_0, ..., r_I); grad_output: (B, ..., O). Leading factors are applied to grad_output
    (sum_lead gy x_hat = sum_lead' (gy x U^T) core). The fan-in factor then lifts either the
    (O, r_I) result or, when the core has fewer rows than r_I (a rank above the batch), the core
    itself: O r_I I multiply-adds against R r_I I + O R I for R rows, whichever is fewer.
    Returns (O, I).
    """
    leading = list(factors[:-1]) + [None]
    gy = project(grad_output, leading)                                    # (r_0, ..., O)
    last = gy.dim() - 1
    u_fan_in = factors[-1]
    if u_fan_in is None:
        return mode_contract(gy, core, last)                              # (O, I)
    o, (i, r) = gy.shape[-1], u_fan_in.shape
    rows = core.numel() // max(r, 1)
    if rows * r * i + o * rows * i < o * r * i + o * rows * r:
        return mode_contract(gy, core @ u_fan_in.t(), last)               # x_hat rebuilt: (R, I)
    return mode_contract(gy, core, last) @ u_fan_in.t()                   # (O, r_I) lifted


class TuckerLinearFunction(torch.autograd.Function):
    """linear(x, W, b) that saves only the Tucker core of x (plus references to its factors).

    Inputs: x (B, ..., I), weight (O, I), bias (O,) or None, then one factor (n_m, r_m) or None per
    dim of x. Outputs: (y (B, ..., O), core); the core is non-differentiable.
    """

    @staticmethod
    def forward(x, weight, bias, *factors):
        return F.linear(x, weight, bias), project(x, factors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, *factors = inputs
        _, core = output
        ctx.mark_non_differentiable(core)
        ctx.save_for_backward(core, weight, *factors)
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_core):
        core, weight, *factors = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = (grad_output @ weight.to(grad_output.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            work = torch.promote_types(core.dtype, weight.dtype)
            factors_w = [None if u is None else u.to(work) for u in factors]
            grad_weight = tucker_linear_grad_weight(core.to(work), factors_w, grad_output.to(work))
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
        return (grad_input, grad_weight, grad_bias) + (None,) * len(factors)
