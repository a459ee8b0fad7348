"""Mode unfolding and mode products: the only place tensors are unfolded or projected.

Notation (docs/core.md): ``unfold(x, m)`` is the matrix X_(m) whose rows are indexed by mode ``m`` and
whose columns run over all other modes. ``mode_product(x, M, m)`` multiplies every mode-m fibre by
``M``. A Tucker representation is a core ``G`` plus one factor per mode, ``None`` where the mode is
kept at full size: ``x_hat = G x_0 U_0 x_1 U_1 ...``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

Factors = Sequence[Optional[Tensor]]


def unfold(x: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding. x: (n_0, ..., n_{d-1}) -> (n_mode, prod of the other n)."""
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def fold(matrix: Tensor, mode: int, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`unfold`. matrix: (shape[mode], prod others) -> tensor of ``shape``."""
    moved = [shape[mode]] + [s for i, s in enumerate(shape) if i != mode]
    return matrix.reshape(moved).movedim(0, mode)


def mode_product(x: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """``x x_mode matrix``. x: (..., n, ...), matrix: (m, n) -> (..., m, ...) with m at ``mode``.

    Computed as a (batched) matmul on the (before, n, after) view of x, so x is never permuted
    or copied.
    """
    if matrix.dtype != x.dtype:   # under autocast an earlier product may already be low precision
        matrix = matrix.to(x.dtype)
    shape = x.shape
    before = math.prod(shape[:mode])
    after = math.prod(shape[mode + 1:])
    if after == 1:
        out = x.reshape(before, shape[mode]) @ matrix.t()
    elif before == 1:
        out = matrix @ x.reshape(shape[mode], after)
    else:
        out = torch.matmul(matrix, x.reshape(before, shape[mode], after))
    return out.reshape(*shape[:mode], matrix.shape[0], *shape[mode + 1:])


def mode_contract(x: Tensor, y: Tensor, mode: int) -> Tensor:
    """Contract two tensors over every mode except ``mode``: X_(m) Y_(m)^T without unfolding.

    x: (..., n, ...), y: (..., k, ...) with equal other modes -> (n, k). Works on (before, n,
    after) views; only when the modes after ``mode`` are smaller than n (or k) are the operands
    copied once into (n, before * after) unfoldings, which is then the faster product.
    """
    n, k = x.shape[mode], y.shape[mode]
    before = math.prod(x.shape[:mode])
    x3 = x.reshape(before, n, -1)
    y3 = y.reshape(before, k, -1)
    if before == 1:
        return x3[0] @ y3[0].t()
    if x3.shape[2] == 1:
        return x3[:, :, 0].t() @ y3[:, :, 0]
    if x3.shape[2] < max(n, k):
        # short rows: one (n, before * after) matmul beats ``before`` small ones and their
        # (before, n, k) partial sums, at the price of one copy of each operand
        xm = x3.transpose(0, 1).reshape(n, -1)
        ym = xm if y is x else y3.transpose(0, 1).reshape(k, -1)
        return xm @ ym.t()
    return torch.bmm(x3, y3.transpose(1, 2)).sum(0)


def project(x: Tensor, factors: Factors) -> Tensor:
    """Core ``G = x x_m U_m^T`` over every mode whose factor is not None. U_m: (n_m, r_m).

    Modes are contracted in the order that shrinks the tensor most first, which minimises work.
    The result is contiguous, so saving it never keeps ``x`` alive.
    """
    order = sorted(
        (m for m, u in enumerate(factors) if u is not None),
        key=lambda m: factors[m].shape[1] / factors[m].shape[0],
    )
    core = x
    for m in order:
        core = mode_product(core, factors[m].t(), m)
    return compact(core)


def projection_macs(shape: Sequence[int], ranks: Sequence[Optional[int]]) -> tuple[int, list[int]]:
    """Multiply-adds of :func:`project` for a tensor of ``shape`` onto factors of ``ranks``
    (None = mode kept), contracting in the same order. Returns (MACs, core shape)."""
    current = list(shape)
    order = sorted((m for m, r in enumerate(ranks) if r is not None),
                   key=lambda m: ranks[m] / shape[m])
    macs = 0
    for m in order:
        macs += math.prod(current) * ranks[m]
        current[m] = ranks[m]
    return macs, current


def reconstruct(core: Tensor, factors: Factors, modes: Optional[Sequence[int]] = None) -> Tensor:
    """``core x_m U_m`` for the given ``modes`` (default: every mode with a factor)."""
    if modes is None:
        modes = [m for m, u in enumerate(factors) if u is not None]
    out = core
    for m in modes:
        if factors[m] is not None:
            out = mode_product(out, factors[m], m)
    return out


def compact(t: Tensor) -> Tensor:
    """``t`` with a storage of exactly its own size. A truncated view such as ``U[:, :k]`` keeps the
    whole ``U`` alive, and ``.contiguous()`` does not copy when the view happens to be contiguous
    (a single column of a column-major matrix): saving such a view silently costs all of ``U``."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def core_shape(shape: Sequence[int], factors: Factors) -> tuple[int, ...]:
    """Shape of the core for an input of ``shape``: compressed modes take their rank."""
    return tuple(n if u is None else u.shape[1] for n, u in zip(shape, factors))


def tucker_bytes(shape: Sequence[int], factors: Sequence, element_size: int) -> int:
    """Bytes of core + factors for an input of ``shape``. ``factors`` holds, per mode,
    a factor (n_m, r_m), its shape as a pair, or None. A factor whose row count does not match its
    mode (a fixed batch factor on a batch of another size) counts as uncompressed."""
    core = 1
    extra = 0
    for m, n in enumerate(shape):
        u = factors[m] if m < len(factors) else None
        rows, rank = (None, None) if u is None else tuple(u.shape if hasattr(u, "shape") else u)
        if u is None or rows != n:
            core *= n
        else:
            core *= rank
            extra += rows * rank
    return (core + extra) * element_size
