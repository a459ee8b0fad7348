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
    if device.type == "cpu":
        pcg = np.random.Generator(np.random.PCG64(int(seed)))
        uniform = lambda n: torch.from_numpy(pcg.random(n, dtype=np.float32))     # noqa: E731
    else:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        uniform = lambda n: torch.rand(n, generator=gen, device=device)          # noqa: E731
    mask = torch.empty(tuple(shape), dtype=torch.bool, device=device)
    flat = mask.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start: start + _CHUNK]
        torch.lt(uniform(part.numel()), 1.0 - p, out=part)
    return mask


def apply_keep_mask(t: Tensor, mask: Tensor, p: float, inplace: bool = False) -> Tensor:
    """t * mask / (1 - p): dropout's forward on x, and its backward on grad_output. mask: bool,
    broadcastable against t."""
    factor = as_factor(mask)
    out = t.mul_(factor) if inplace else torch.mul(t, factor)
    return out.mul_(1.0 / (1.0 - p))


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
        y = apply_keep_mask(x, mask, p, inplace)
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
        return apply_keep_mask(grad_output, mask, ctx.p), None, None, None


def compact_dropout(x: Tensor, p: float, mode: str = "packed", inplace: bool = False) -> Tensor:
    """Training-mode dropout saving a seed or a 1-bit mask. p in [0, 1)."""
    if mode not in MODES:
        raise ValueError(f"dropout mode {mode!r}: choose one of {MODES}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p={p} must be in [0, 1) for a compact dropout")
    y, _ = CompactDropoutFunction.apply(x, float(p), mode, bool(inplace))
    return y
