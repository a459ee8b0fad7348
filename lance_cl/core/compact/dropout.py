"""Dropout whose backward regenerates its mask from a saved seed (or reads it bit-packed).

Plain dropout saves a mask as large as its input. Here the forward draws one 64-bit seed from
the global CPU generator (so the global random stream advances reproducibly),
generates the keep-mask with a private generator seeded by it (on a CPU numpy's PCG64, which
draws uniforms about twice as fast as torch's CPU generator; elsewhere a torch generator of the
device), and saves the 1-bit mask
(``mode="packed"``, the default: numel / 8 bytes, 1/32 of a float mask) or only the seed
(``mode="regenerate"``: 8 bytes, but the mask is drawn a second time in backward, which costs
about 8% of an AlexNet-5 training step on a CPU; docs/memory.md). Scaling is
1 / (1 - p) as in ``torch.nn.Dropout``; the mask itself differs from PyTorch's (another stream), so
outputs agree with plain dropout in distribution, and gradients are exact for the mask drawn.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .bitpack import as_factor, pack_bits, unpack_bits

MODES = ("packed", "regenerate")
_CHUNK = 1 << 20


def keep_mask(shape: Sequence[int], p: float, seed: int, device: torch.device) -> Tensor:
    """Bool mask of ``shape``, True with probability 1 - p, a pure function of ``seed`` (and of
    the device type: CPU masks come from numpy's PCG64, others from a torch generator)."""
    device = torch.device(device)
    # P(U < 1 - p) = 1 - p for U uniform on [0, 1): twice as fast as a bool bernoulli_ on a CPU.
    # Drawn in chunks, so the float sample never costs more than _CHUNK elements of memory.
    mask = torch.empty(tuple(shape), dtype=torch.bool, device=device)
    flat = mask.view(-1)
    if device.type == "cpu":
        gen = np.random.Generator(np.random.PCG64(int(seed)))
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start: start + _CHUNK]
            uniform = torch.from_numpy(gen.random(part.numel(), dtype=np.float32))
            torch.lt(uniform, 1.0 - p, out=part)
        return mask
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start: start + _CHUNK]
        torch.lt(torch.rand(part.numel(), generator=gen, device=device), 1.0 - p, out=part)
    return mask


def draw_seed() -> int:
    """One 62-bit seed from the global CPU generator (so ``torch.manual_seed`` covers it)."""
    # From the CPU generator on every device: no host-device sync.
    return int(torch.randint(0, 2 ** 62, (1,)))


class CompactDropoutFunction(torch.autograd.Function):
    """y = x * mask / (1 - p). x: any shape. Saves a seed (int64 (1,)) or the packed mask."""

    @staticmethod
    def forward(x: Tensor, p: float, mode: str, inplace: bool) -> tuple[Tensor, Tensor]:
        seed = draw_seed()
        mask = keep_mask(x.shape, p, seed, x.device)
        scale = 1.0 / (1.0 - p)
        factor = as_factor(mask)
        y = x.mul_(factor).mul_(scale) if inplace else torch.mul(x, factor).mul_(scale)
        saved = torch.tensor([seed], dtype=torch.int64) if mode == "regenerate" else pack_bits(mask)
        return y, saved

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, p, mode, inplace = inputs
        _, saved = output
        if inplace:
            ctx.mark_dirty(x)
        ctx.mark_non_differentiable(saved)
        ctx.save_for_backward(saved)
        ctx.p, ctx.mode, ctx.shape, ctx.device = p, mode, x.shape, x.device

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor, _grad_saved):
        (saved,) = ctx.saved_tensors
        if ctx.mode == "regenerate":
            mask = keep_mask(ctx.shape, ctx.p, int(saved[0]), ctx.device)
        else:
            mask = unpack_bits(saved, ctx.shape)
        grad = torch.mul(grad_output, as_factor(mask)).mul_(1.0 / (1.0 - ctx.p))
        return grad, None, None, None


def compact_dropout(x: Tensor, p: float, mode: str = "packed", inplace: bool = False) -> Tensor:
    """Training-mode dropout saving a seed or a 1-bit mask. p in [0, 1)."""
    if mode not in MODES:
        raise ValueError(f"dropout mode {mode!r}: choose one of {MODES}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p={p} must be in [0, 1) for a compact dropout")
    y, _ = CompactDropoutFunction.apply(x, float(p), mode, bool(inplace))
    return y
