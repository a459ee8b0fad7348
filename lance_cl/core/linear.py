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
    (sum_lead gy x_hat = sum_lead' (gy x U^T) core), then the fan-in factor lifts the result.
    Returns (O, I).
    """
    leading = list(factors[:-1]) + [None]
    gy = project(grad_output, leading)                                    # (r_0, ..., O)
    m = mode_contract(gy, core, gy.dim() - 1)                             # (O, r_I)
    u_fan_in = factors[-1]
    return m if u_fan_in is None else m @ u_fan_in.t()


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
