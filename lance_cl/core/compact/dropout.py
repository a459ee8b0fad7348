"""Dropout whose backward regenerates its mask from a saved seed (or reads it bit-packed).

Plain dropout saves a mask as large as its input. Here the forward draws one 64-bit seed from
the global CPU generator (so the global random stream advances reproducibly),
generates the keep-mask with a private generator seeded by it (on a CPU numpy's SFC64, whose raw
32-bit integers compared with a threshold give the mask 3-4x faster than torch's CPU generator;
elsewhere a torch generator of the device), and saves the 1-bit mask
(``mode="packed"``, the default: numel / 8 bytes, 1/32 of a float mask) or only the seed
(``mode="regenerate"``: 8 bytes, but the mask is drawn a second time in backward, which costs
about 8% of an AlexNet-5 training step on a CPU; docs/memory.md). Scaling is
1 / (1 - p) as in ``torch.nn.Dropout``; the mask itself differs from PyTorch's (another stream), so
outputs agree with plain dropout in distribution, and gradients are exact for the mask drawn.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .bitpack import multiply_by_mask, pack_bits

MODES = ("packed", "regenerate")
_CHUNK = 1 << 20


def keep_mask(shape: Sequence[int], p: float, seed: int, device: torch.device) -> Tensor:
    """Bool mask of ``shape``, True with probability 1 - p, a pure function of ``seed`` (and of
    the device type: CPU masks come from numpy's SFC64, others from a torch generator)."""
    device = torch.device(device)
    mask = torch.empty(tuple(shape), dtype=torch.bool, device=device)
    flat = mask.view(-1)
    keep = 1.0 - float(p)
    if keep >= 1.0:
        return flat.fill_(True).view(mask.shape)
    # Drawn in chunks, so a sample never costs more than _CHUNK elements of memory.
    if device.type == "cpu":
        # u < T for u uniform on the 32-bit integers: P = T / 2^32, within 2^-33 of 1 - p. The
        # integers are the raw output of the bit generator (two per 64-bit word): no float
        # conversion: ~4x faster than torch's CPU bernoulli_, ~2x faster than uniform floats.
        bits = np.random.SFC64(int(seed))
        threshold = np.uint32(min(round(keep * 2.0 ** 32), 2 ** 32 - 1))
        out = flat.numpy()
        for start in range(0, flat.numel(), _CHUNK):
            n = min(_CHUNK, flat.numel() - start)
            words = bits.random_raw((n + 1) // 2).view(np.uint32)[:n]
            np.less(words, threshold, out=out[start: start + n])
        return mask
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start: start + _CHUNK]
        torch.lt(torch.rand(part.numel(), generator=gen, device=device), keep, out=part)
    return mask


def apply_keep_mask(t: Tensor, packed: Tensor, mask_shape: Sequence[int], p: float,
                    inplace: bool = False) -> Tensor:
    """t * mask / (1 - p) with mask = ``unpack_bits(packed, mask_shape)`` (broadcastable against
    t): dropout's forward on x, and its backward on grad_output, in one pass
    (:func:`~lance_cl.core.compact.bitpack.multiply_by_mask`)."""
    return multiply_by_mask(t, packed, mask_shape, on=1.0 / (1.0 - p), inplace=inplace)


def draw_seed() -> int:
    """One 62-bit seed from the global CPU generator (so ``torch.manual_seed`` covers it)."""
    # From the CPU generator on every device: no host-device sync.
    return int(torch.randint(0, 2 ** 62, (1,)))


class CompactDropoutFunction(torch.autograd.Function):
    """y = x * mask / (1 - p). x: any shape. Saves a seed (int64 (1,)) or the packed mask.

    Inputs: x, p, mode, inplace, seed (None: one drawn by :func:`draw_seed`), mask_shape (None:
    x's; a shape broadcastable against x, e.g. (B, C, 1, 1) for per-channel dropout)."""

    @staticmethod
    def forward(x: Tensor, p: float, mode: str, inplace: bool, seed: Optional[int],
                mask_shape: Optional[Sequence[int]]) -> tuple[Tensor, Tensor]:
        seed = draw_seed() if seed is None else int(seed)
        shape = x.shape if mask_shape is None else mask_shape
        packed = pack_bits(keep_mask(shape, p, seed, x.device))
        y = apply_keep_mask(x, packed, shape, p, inplace)
        saved = torch.tensor([seed], dtype=torch.int64) if mode == "regenerate" else packed
        return y, saved

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, p, mode, inplace, _, mask_shape = inputs
        _, saved = output
        if inplace:
            ctx.mark_dirty(x)
        ctx.mark_non_differentiable(saved)
        ctx.save_for_backward(saved)
        ctx.p, ctx.mode, ctx.device = p, mode, x.device
        ctx.shape = x.shape if mask_shape is None else tuple(mask_shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor, _grad_saved):
        (saved,) = ctx.saved_tensors
        if ctx.mode == "regenerate":
            packed = pack_bits(keep_mask(ctx.shape, ctx.p, int(saved[0]), ctx.device))
        else:
            packed = saved
        return apply_keep_mask(grad_output, packed, ctx.shape, ctx.p), None, None, None, None, None


def compact_dropout(x: Tensor, p: float, mode: str = "packed", inplace: bool = False,
                    seed: Optional[int] = None, mask_shape: Optional[Sequence[int]] = None) -> Tensor:
    """Training-mode dropout saving a seed or a 1-bit mask. p in [0, 1). ``seed``: the mask's
    (:func:`keep_mask`; None: drawn from the global generator); ``mask_shape``: broadcastable
    against x (None: x's shape)."""
    if mode not in MODES:
        raise ValueError(f"dropout mode {mode!r}: choose one of {MODES}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p={p} must be in [0, 1) for a compact dropout")
    mask_shape = None if mask_shape is None else tuple(int(n) for n in mask_shape)
    y, _ = CompactDropoutFunction.apply(x, float(p), mode, bool(inplace), seed, mask_shape)
    return y
