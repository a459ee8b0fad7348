"""Segments recomputed in backward instead of stored: the cheapest way to "save" a stem block
whose input the training loop holds anyway (the input batch).

:func:`recompute_segment` runs ``fn(x)`` under ``torch.utils.checkpoint`` (non-reentrant, random
state preserved, so dropout masks are reproduced exactly) and then marks ``x`` as saved with a
zero-cost autograd node, so the accounting's saved-tensor hooks see the one tensor the segment
really keeps. Batch-norm running statistics are restored after the recomputation, so a
recomputed segment updates them once, as a stored one does.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ...train_modes import preserved_buffers
from .chunked import ChunkedBlock, chunk_count, chunked_block


class _KeepAlive(torch.autograd.Function):
    """Identity on ``y`` that saves ``x``: what a recomputed segment holds for its backward."""

    @staticmethod
    def forward(y: Tensor, x: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        return grad_output, None


# a chunked block's conv output per chunk: about this many bytes (feature maps smaller than two
# of these are recomputed whole: chunking them would save little memory and cost time)
CHUNK_BYTES = 1 << 20


TAILS = ("recompute", "keep")


def check_tail(tail: str) -> str:
    """Validate a chunked segment's tail option (:data:`TAILS`)."""
    if tail not in TAILS:
        raise ValueError(f"segment_tail={tail!r}: choose 'recompute' (save only the segment's "
                         f"input) or 'keep' (also its tail's 1-bit masks and pool offsets, a "
                         f"faster backward)")
    return tail


def recompute_segment(fn: Callable[[Tensor], Tensor], x: Tensor, owner: nn.Module,
                      modules: Optional[Sequence[nn.Module]] = None, chunks: int = 8,
                      tail: str = "recompute") -> Tensor:
    """``fn(x)`` whose internal activations are recomputed in backward. ``owner``: a module that
    contains every module ``fn`` calls (its batch norms keep their running statistics).
    ``modules``: what ``fn`` applies, in order, when known; a conv -> BatchNorm2d -> per-sample
    chain whose conv output exceeds two :data:`CHUNK_BYTES` is then recomputed in up to
    ``chunks`` batch chunks of about that size (:mod:`.chunked`), which keeps one chunk's feature
    maps alive in backward instead of the whole batch's. ``tail="keep"``: such a chain keeps
    its per-sample ops' compact graph (1-bit masks, uint8 pool offsets) from the forward, so the
    backward recomputes only the conv and the normalisation (:mod:`.chunked`)."""
    if not torch.is_grad_enabled():
        return fn(x)
    block = ChunkedBlock.from_modules(modules, 2) if modules is not None else None
    if block is not None:
        n = chunk_count(block.conv, x, chunks, CHUNK_BYTES)
        if n >= 2:
            return chunked_block(x, dataclasses.replace(block, chunks=n,
                                                        keep_tail=check_tail(tail) == "keep"))
    norms = [m for m in owner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    context = (lambda: (contextlib.nullcontext(), preserved_buffers(norms)))
    y = checkpoint(fn, x, use_reentrant=False, preserve_rng_state=True, context_fn=context)
    return _KeepAlive.apply(y, x)
