"""Batch normalisation that saves its normalised input once, at a chosen precision.

Plain ``batch_norm`` saves its input; a following plain ReLU saves its output, a second tensor of
the same size. Here PyTorch's own kernel normalises (and updates the running statistics), the
affine part is one fused multiply-add, and the saved tensor is x_hat = (x - mean) * invstd,
from which the backward gets every gradient (a compact ReLU after it saves only a 1-bit mask). With batch statistics, per channel c
over the n = numel / C elements of c, and g_hat = grad_output * gamma:

    grad_x     = invstd * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat))
    grad_gamma = sum(grad_output * x_hat),   grad_beta = sum(grad_output)

With running statistics grad_x = g_hat * invstd, and x_hat is saved only when gamma needs a
gradient (a frozen BatchNorm in eval mode saves no activation at all).

``storage``: "float" (x's dtype: exact gradients), "bf16" (2 bytes, ~3 significant digits) or
"int8" (1 byte, one symmetric scale per channel). The reduced forms are approximations whose
gradient error the bench measures; they are never a default. The output equals PyTorch's
``batch_norm`` to rounding (the affine part is applied to x_hat instead of being folded into one
scale and shift), and the backward holds a single x-sized temporary.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

STORAGES = ("float", "bf16", "int8")


def _channel_view(t: Tensor, like: Tensor) -> Tensor:
    """(C,) -> broadcastable against ``like`` (B, C, ...)."""
    return t.view((1, -1) + (1,) * (like.dim() - 2))


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def encode(x_hat: Tensor, storage: str) -> tuple[Tensor, Optional[Tensor]]:
    """x_hat (B, C, ...) -> (stored tensor, per-channel scale (C,) for int8, else None)."""
    if storage == "float":
        return x_hat, None
    if storage == "bf16":
        return x_hat.to(torch.bfloat16), None
    amax = x_hat.detach().abs().amax(dim=_reduce_dims(x_hat)).float().clamp_min(1e-12)
    scale = amax / 127.0
    q = torch.round(x_hat.float() / _channel_view(scale, x_hat)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def decode(stored: Tensor, scale: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`encode` (up to its rounding), as ``dtype``."""
    if scale is None:
        return stored.to(dtype)
    return stored.to(dtype) * _channel_view(scale.to(dtype), stored)


class CompactBatchNormFunction(torch.autograd.Function):
    """batch_norm(x, ...) saving x_hat once. x: (B, C) or (B, C, *spatial).

    Inputs: x, weight (C,) or None, bias (C,) or None, running_mean / running_var (C,) or None,
    use_batch_stats, momentum (the exponential-average factor), eps, storage.
    """

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, use_batch_stats: bool, momentum: float,
                eps: float, storage: str):
        # PyTorch's kernel without the affine part gives x_hat (and updates the running statistics)
        x_hat, mean, invstd = torch.native_batch_norm(x, None, None, running_mean, running_var,
                                                      use_batch_stats, momentum, eps)
        if not use_batch_stats:
            invstd = torch.rsqrt(running_var + eps)
        if weight is None:
            y = x_hat.clone() if bias is None else x_hat + _channel_view(bias, x_hat)
        elif bias is None:
            y = x_hat * _channel_view(weight, x_hat)
        else:
            y = torch.addcmul(_channel_view(bias, x_hat), x_hat, _channel_view(weight, x_hat))
        stored, scale = encode(x_hat, storage)
        return y, stored, scale, invstd.to(torch.promote_types(x.dtype, torch.float32))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, _, _, use_batch_stats, _, _, _ = inputs
        _, stored, scale, invstd = output
        ctx.mark_non_differentiable(stored, invstd)
        if scale is not None:
            ctx.mark_non_differentiable(scale)
        weight_grad = weight is not None and weight.requires_grad
        keep_x_hat = use_batch_stats or weight_grad
        ctx.save_for_backward(stored if keep_x_hat else None, scale if keep_x_hat else None,
                              invstd, weight)
        ctx.use_batch_stats = use_batch_stats
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.eps = inputs[7]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _g_stored, _g_scale, _g_invstd):
        stored, scale, invstd, weight = ctx.saved_tensors
        want = ctx.needs_input_grad
        g = grad_output
        dims = _reduce_dims(g)
        grad_x = grad_w = grad_b = None
        if ctx.use_batch_stats:
            # Written out rather than PyTorch's fused kernel, which holds two x-sized buffers at
            # once: here the only x-sized temporary (g * x_hat) is freed before grad_x exists,
            # so a step's peak holds one gradient-sized tensor less.
            x_hat = decode(stored, scale, g.dtype)
            n = g.numel() // g.shape[1]
            sum_gx = (g * x_hat).sum(dim=dims)
            sum_g = g.sum(dim=dims)
            if weight is not None and want[1]:
                grad_w = sum_gx
            if ctx.has_bias and want[2]:
                grad_b = sum_g
            if want[0]:
                gamma = 1.0 if weight is None else weight.to(invstd)
                coeff = (gamma * invstd).to(g.dtype)
                grad_x = torch.addcmul(g, x_hat, _channel_view(-sum_gx / n, g))
                grad_x.sub_(_channel_view(sum_g / n, g)).mul_(_channel_view(coeff, g))
        else:
            if want[0]:
                scaled = invstd if weight is None else weight.to(invstd) * invstd
                grad_x = g * _channel_view(scaled.to(g.dtype), g)
            if weight is not None and want[1]:
                grad_w = (g * decode(stored, scale, g.dtype)).sum(dim=dims)
            if ctx.has_bias and want[2]:
                grad_b = g.sum(dim=dims)
        grad_x = None if grad_x is None else grad_x.to(ctx.x_dtype)
        grad_w = None if grad_w is None or weight is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(weight.dtype if weight is not None else ctx.x_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def compact_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       use_batch_stats: bool, momentum: float, eps: float,
                       storage: str = "float") -> Tensor:
    """``F.batch_norm`` semantics (``momentum`` is the exponential-average factor) with compact
    saved state. x: (B, C) or (B, C, *spatial)."""
    if storage not in STORAGES:
        raise ValueError(f"batch-norm storage {storage!r}: choose one of {STORAGES}")
    if not use_batch_stats and (running_mean is None or running_var is None):
        raise ValueError("batch norm without batch statistics needs running_mean and running_var")
    y, *_ = CompactBatchNormFunction.apply(x, weight, bias, running_mean, running_var,
                                           bool(use_batch_stats), float(momentum), float(eps), storage)
    return y
