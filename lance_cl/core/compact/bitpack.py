"""Boolean masks stored at one bit per element: the form every compact op saves its masks in.

Packing reads eight bools (one byte each, 0 or 1) as one int64 and gathers their low bits into
the top byte with one multiply (the 0x0102...80 constant puts bit b_i at position 56 + i, and no
two partial products overlap). Unpacking looks up each byte in a 256-entry table of eight bools
with ``index_select`` and int32 indices (on a CPU about 6x faster than indexing the table with an
int64 tensor, which goes through advanced indexing; docs/memory.md). On a CPU, packing is
numpy's ``packbits`` instead, which gives the same bytes.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

_GATHER = 0x0102040810204080


def _bit_table() -> Tensor:
    """(256,) int64 whose 8 bytes are the bits of the index, least significant first."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return bits.to(torch.uint8).view(torch.int64).view(-1)


# built at import, so that its 2 KiB never land in the peak memory of a process's first step
_TABLES: dict[torch.device, Tensor] = {torch.device("cpu"): _bit_table()}


def _unpack_table(device: torch.device) -> Tensor:
    """The table of :func:`_bit_table` on ``device``."""
    table = _TABLES.get(device)
    if table is None:
        table = _TABLES[device] = _TABLES[torch.device("cpu")].to(device)
    return table


def pack_bits(mask: Tensor) -> Tensor:
    """mask: bool tensor of any shape -> uint8 (ceil(numel / 8),), bit i of byte k = element 8k + i.

    On a CPU numpy's ``packbits`` (little bit order: the same layout) does it 3x-4x faster;
    its result is copied into a tensor PyTorch allocates, so that the bytes show in PyTorch's
    memory accounting (a step's measured peak, docs/memory.md)."""
    if mask.device.type == "cpu":
        bits = np.packbits(mask.detach().reshape(-1).numpy(), bitorder="little")
        packed = torch.empty(bits.shape, dtype=torch.uint8)
        packed.numpy()[...] = bits
        return packed
    return _pack_by_multiply(mask)


def _pack_by_multiply(mask: Tensor) -> Tensor:
    """:func:`pack_bits` on any device, by the one-multiply gather of the module docstring."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.contiguous().view(torch.uint8).view(torch.int64)
    return ((words * _GATHER) >> 56).to(torch.uint8)


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 (ceil(numel / 8),) -> bool tensor of ``shape``."""
    words = _unpack_table(packed.device).index_select(0, packed.int())
    return words.view(torch.uint8).view(torch.bool)[:_numel(shape)].view(tuple(shape))


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(n) for n in shape)


def packed_nbytes(numel: int) -> int:
    """Bytes :func:`pack_bits` uses for a mask of ``numel`` elements."""
    return (int(numel) + 7) // 8


_FACTOR_TABLES: dict[tuple, Tensor] = {}


def _factor_table(device: torch.device, dtype: torch.dtype, on: float, off: float) -> Tensor:
    """(256, 8) of ``dtype``: row k holds ``on`` where bit i of k is set, ``off`` elsewhere."""
    key = (device, dtype, float(on), float(off))
    table = _FACTOR_TABLES.get(key)
    if table is None:
        bits = _unpack_table(device).view(torch.uint8).view(torch.bool).view(256, 8)
        table = torch.where(bits, torch.tensor(on, dtype=dtype, device=device),
                            torch.tensor(off, dtype=dtype, device=device))
        if len(_FACTOR_TABLES) >= 64:      # a few (dtype, value) pairs per model in practice
            _FACTOR_TABLES.clear()
        _FACTOR_TABLES[key] = table
    return table


def unpack_factor(packed: Tensor, shape: Sequence[int], dtype: torch.dtype, on: float = 1.0,
                  off: float = 0.0) -> Tensor:
    """The mask :func:`unpack_bits` gives, as a new tensor of ``dtype`` and ``shape`` holding
    ``on`` where the mask is set and ``off`` elsewhere (``on`` and ``off`` rounded to ``dtype``).

    A backward multiplies grad_output by it in place: one table look-up and one same-dtype
    product, where multiplying by the bool mask (or its uint8 bytes) makes PyTorch convert the
    mask to the float type first, a third pass over the tensor (docs/memory.md)."""
    table = _factor_table(packed.device, dtype, on, off)
    return table.index_select(0, packed.int()).view(-1)[:_numel(shape)].view(tuple(shape))


_REDUCED = (torch.float16, torch.bfloat16)


def _factor_dtype(dtype: torch.dtype, on: float, off: float) -> torch.dtype:
    """``dtype`` where it holds ``on`` and ``off`` exactly or is float32 / float64 (whose
    products by a Python scalar PyTorch computes in the same dtype), else float32: PyTorch
    multiplies half / bfloat16 tensors by a scalar in float32 and rounds once."""
    if dtype in _REDUCED and any(torch.tensor(v, dtype=dtype).item() != v for v in (on, off)):
        return torch.float32
    return dtype


def multiply_by_mask(t: Tensor, packed: Tensor, mask_shape: Sequence[int], on: float = 1.0,
                     off: float = 0.0, inplace: bool = False) -> Tensor:
    """``t * where(mask, on, off)`` in t's dtype, mask = ``unpack_bits(packed, mask_shape)``
    (broadcastable against t), rounded as PyTorch rounds ``t * on`` and ``t * off``.

    One pass over t, by the factor of :func:`unpack_factor`. t: any shape; in place if asked."""
    factor = unpack_factor(packed, mask_shape, _factor_dtype(t.dtype, on, off), on, off)
    if inplace:
        return t.mul_(factor)
    if factor.dtype == t.dtype and factor.shape == t.shape:
        return factor.mul_(t)
    return torch.mul(t, factor).to(t.dtype)
