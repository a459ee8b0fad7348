"""Boolean masks stored at one bit per element: the form every compact op saves its masks in."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

_BIT_WEIGHTS: dict[torch.device, Tensor] = {}


def _weights(device: torch.device) -> Tensor:
    w = _BIT_WEIGHTS.get(device)
    if w is None:
        w = _BIT_WEIGHTS[device] = (2 ** torch.arange(8, device=device)).to(torch.uint8)
    return w


def pack_bits(mask: Tensor) -> Tensor:
    """mask: bool tensor of any shape -> uint8 (ceil(numel / 8),), bit i of byte k = element 8k + i."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # bit i carries weight 2^i; the eight weighted bits of a byte never overlap, so a sum packs them
    return (flat.view(-1, 8).to(torch.uint8) * _weights(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 (ceil(numel / 8),) -> bool tensor of ``shape``."""
    numel = 1
    for n in shape:
        numel *= int(n)
    bits = packed.unsqueeze(1).bitwise_and(_weights(packed.device)).ne(0)
    return bits.reshape(-1)[:numel].reshape(tuple(shape))


def packed_nbytes(numel: int) -> int:
    """Bytes :func:`pack_bits` uses for a mask of ``numel`` elements."""
    return (int(numel) + 7) // 8
