"""A conv block recomputed in backward one batch chunk at a time.

``conv -> BatchNorm -> per-sample tail`` (activation, dropout, pooling) is the stem of most
small CNNs. Recomputing it whole in backward (``torch.utils.checkpoint``) saves nothing but its
input, yet the recomputation materialises every full-batch feature map of the block at the
worst moment of the step, when the parameter gradients are already allocated. Here the block
is recomputed ``chunks`` samples-groups at a time, so backward holds one chunk's feature maps.

Batch statistics couple the samples, so the backward makes two passes over the chunks. With
x_hat = (z - mean) * invstd the normalised conv output, u = gamma * x_hat + beta the
BatchNorm output and g_hat = dL/du * gamma, per channel over the n = B * H * W positions:

    dL/dz = invstd * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat))

Pass 1 recomputes each chunk to get the two means; pass 2 recomputes it again and sends
dL/dz through the conv's own backward (a compressed layer computes its weight gradient from
its core, as usual), dL/dgamma = sum(dL/du * x_hat) and dL/dbeta = sum(dL/du) into the
BatchNorm's parameters. With running statistics (eval mode) the two means vanish and one pass
suffices. The gradients are those of the whole-batch block; dropout masks are drawn chunk by
chunk from private generators seeded by one seed the forward draws from the global generator
(:func:`chunk_seed`), and redrawn identically in every pass.

When only the conv's own weight and bias want gradients (the stem of a network: its input is
the data), a single pass does: the conv's backward is linear in dL/dz and each output channel's
rows of dW and db depend on that channel of dL/dz only, so with per-channel constants

    dW[o] = invstd_o * (gamma_o * dW(dL/du)[o] - m1_o * dW(1)[o] - m2_o * dW(x_hat)[o]),

m1 = mean(g_hat), m2 = mean(g_hat * x_hat), and the three gradients dW(dL/du), dW(1), dW(x_hat)
(each through the conv's own backward) are summed over the chunks before the means are known.

With ``keep_tail`` the forward keeps each chunk's tail graph instead of recomputing it: when
every tail op saves compactly (ReLU-family 1-bit masks, dropout's bit-packed mask, max-pool's
uint8 offsets), that costs those bytes per step and spares the backward the tail's forward
(about 9 % of an AlexNet-5 training step on a CPU; docs/memory.md); the conv and the
normalisation are recomputed as before.

Like reentrant checkpointing, the backward calls ``torch.autograd.backward`` on the recomputed
graph, so every leaf the block's modules use (hooks and parametrizations included) receives its
gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.utils.parametrize  # noqa: F401  (torch.nn.utils.parametrize.is_parametrized)
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .activation import masked_activation
from .bitpack import pack_bits
from .dropout import apply_keep_mask, compact_dropout, draw_seed, keep_mask
from .pooling import compact_max_pool2d

# modules that act on each sample separately, so a chunk of the batch sees what it would whole
PER_SAMPLE_TYPES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.MaxPool2d, nn.AvgPool2d, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish)


def _activation_args(module: nn.Module) -> Optional[tuple[str, float, float]]:
    """(kind, a, b) of :func:`masked_activation` for a ReLU-family module, else None."""
    if isinstance(module, nn.ReLU):
        return ("hardtanh", 0.0, float("inf"))
    if isinstance(module, nn.Hardtanh):          # ReLU6 included
        return ("hardtanh", float(module.min_val), float(module.max_val))
    if isinstance(module, nn.LeakyReLU) and module.negative_slope >= 0:
        return ("leaky_relu", float(module.negative_slope), 0.0)
    return None


def _saves_compactly(module: nn.Module) -> bool:
    """True when the tail op, run by :meth:`ChunkedBlock.tail_forward` with ``keep``, saves no
    full-size float tensor (1-bit masks, uint8 offsets, or nothing)."""
    if isinstance(module, nn.MaxPool2d):
        return not module.return_indices
    return isinstance(module, (nn.Dropout, nn.Dropout2d, nn.Identity)) \
        or _activation_args(module) is not None


@dataclass(frozen=True)
class ChunkedBlock:
    """``tail(norm(conv(x)))``, recomputed in backward ``chunks`` parts at a time (``keep_tail``:
    the tail's compact graph kept from the forward instead, :meth:`keeps_tail`)."""

    conv: nn.Module
    norm: nn.modules.batchnorm._BatchNorm
    tail: tuple[nn.Module, ...]
    chunks: int = 4
    keep_tail: bool = False

    @classmethod
    def from_modules(cls, modules: Sequence[nn.Module], chunks: int = 4) -> Optional["ChunkedBlock"]:
        """The block for ``modules`` = (conv, norm, *per-sample tail), or None when they are not
        of that form (the caller then recomputes the segment whole)."""
        if len(modules) < 2 or chunks < 2:
            return None
        conv, norm, *tail = modules
        if not isinstance(conv, nn.Conv2d) or not isinstance(norm, nn.BatchNorm2d):
            return None
        if not all(isinstance(m, PER_SAMPLE_TYPES) for m in tail):
            return None
        return cls(conv, norm, tuple(tail), int(chunks))

    def keeps_tail(self) -> bool:
        """True: the forward keeps the tail's graph (``keep_tail`` asked for it, and every tail op
        saves compactly; otherwise keeping would hold full-size maps of every chunk)."""
        return (self.keep_tail and all(_saves_compactly(m) for m in self.tail)
                and any(not isinstance(m, nn.Identity) for m in self.tail))

    def statistics(self) -> bool:
        """True: the norm normalises with the batch's statistics (training, or no running ones)."""
        n = self.norm
        return n.training or n.running_mean is None

    def tail_forward(self, u: Tensor, seed: int, keep: bool = False) -> Tensor:
        """The per-sample ops on u, with their plain forward (what they save lives for one chunk
        only; max-pooling saves in-window offsets, :mod:`.pooling`); the j-th op's dropout mask
        is drawn from ``seed + j`` (:func:`_dropout`), the same with or without grad. ``keep``:
        activations and dropout save 1-bit masks (the graph outlives the chunk)."""
        for j, module in enumerate(self.tail):
            activation = _activation_args(module) if keep else None
            if isinstance(module, (nn.Dropout, nn.Dropout2d)):
                u = _dropout(u, module, seed + j, keep)
            elif isinstance(module, nn.MaxPool2d) and not module.return_indices:
                u = compact_max_pool2d(u, module.kernel_size, module.stride, module.padding,
                                       module.dilation, module.ceil_mode)
            elif activation is not None:
                u = masked_activation(u, *activation)
            else:
                u = getattr(module, "plain_type", type(module)).forward(module, u)
        return u

    def separable_conv_params(self) -> Optional[list[Tensor]]:
        """The conv's weight and bias that want gradients when they are all it trains and each
        output channel's gradient rows depend on that channel's dL/dz only (no parametrization);
        None otherwise."""
        conv = self.conv
        if torch.nn.utils.parametrize.is_parametrized(conv):
            return None
        named = [(n, p) for n, p in conv.named_parameters() if p.requires_grad]
        if any(n not in ("weight", "bias") or p.shape[0] != conv.out_channels for n, p in named):
            return None
        return [p for _, p in named]


def _dropout(u: Tensor, module: nn.Module, seed: int, keep: bool = False) -> Tensor:
    """Training-mode dropout (element-wise, or per channel for Dropout2d) with the keep-mask
    :func:`~lance_cl.core.compact.dropout.keep_mask` draws from ``seed``: the distribution of
    ``F.dropout``, several times faster on a CPU. ``keep``: the mask is saved bit-packed."""
    p = float(module.p)
    if not module.training or p == 0.0:
        return u
    if p == 1.0:
        return u * 0.0
    shape = u.shape if isinstance(module, nn.Dropout) else u.shape[:2] + (1,) * (u.dim() - 2)
    if keep:
        return compact_dropout(u, p, "packed", seed=seed, mask_shape=shape)
    mask = keep_mask(shape, p, seed, u.device)
    if torch.is_grad_enabled() and u.requires_grad:
        # the recomputed tail's graph: autograd keeps a product's other factor, here the mask's
        # uint8 bytes (1 byte per element) rather than a float factor (4)
        return torch.mul(u, mask.view(torch.uint8)).mul_(1.0 / (1.0 - p))
    return apply_keep_mask(u, pack_bits(mask), shape, p)


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk ``chunk``'s tail (its j-th op draws from the result + j), from the one
    seed a chunked block's forward draws."""
    return (int(seed) + 7919 * int(chunk)) % (2 ** 62)


def chunk_count(conv: nn.Conv2d, x: Tensor, max_chunks: int, chunk_bytes: int) -> int:
    """Chunks that keep each chunk's conv output near ``chunk_bytes`` (at most ``max_chunks``,
    at most one per sample; 1: the block is small enough to recompute whole, which is cheaper
    in time). x: (B, C, H, W)."""
    spatial = []
    for i, size in enumerate(x.shape[2:]):
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        if conv.padding == "same":
            spatial.append(size)
            continue
        p = 0 if conv.padding == "valid" else conv.padding[i]
        spatial.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    out_bytes = x.shape[0] * conv.out_channels * math.prod(spatial) * x.element_size()
    return max(1, min(max_chunks, x.shape[0], math.ceil(out_bytes / max(chunk_bytes, 1))))


def _channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


def channel_moments(parts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Biased variance and mean per channel of the batch whose chunks are ``parts`` (each
    (B_i, C, H, W), contiguous): (var, mean), each (C,).

    Two passes, as ``torch.var_mean(z, dim=(0, 2, 3), unbiased=False)`` computes them: the sums of
    each chunk's (B_i, C, H*W) view, then the squared deviations from the mean one chunk at a
    time (a chunk-sized temporary). On a CPU this is 3-4x faster than ``var_mean`` over
    (0, 2, 3), whose reduction runs across the non-contiguous batch and position axes.
    """
    channels = parts[0].shape[1]
    count = sum(p.shape[0] * p[0, 0].numel() for p in parts)
    mean = sum(p.reshape(p.shape[0], channels, -1).sum(-1).sum(0) for p in parts) / count
    centre = _channel(mean)
    squares = sum(torch.linalg.vector_norm((p - centre).view(p.shape[0], channels, -1), dim=-1)
                  .square().sum(0) for p in parts)
    return squares / count, mean


def _update_running_stats(norm: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor,
                          n: int) -> None:
    """The running-statistics update ``nn.BatchNorm2d`` makes in training (unbiased variance)."""
    if not (norm.training and norm.track_running_stats and norm.running_mean is not None):
        return
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            factor = 1.0 / float(norm.num_batches_tracked)
    norm.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
    norm.running_var.mul_(1 - factor).add_(var * (n / max(n - 1, 1)), alpha=factor)


class _ChunkedBlockFunction(torch.autograd.Function):
    """out = block(x); saves x, the normalisation (mean, invstd) and its dropout masks' seed."""

    @staticmethod
    def forward(x: Tensor, block: ChunkedBlock, *params: Tensor):
        parts = x.tensor_split(block.chunks)
        z = None
        for i, p in enumerate(parts):
            zc = block.conv(p)
            if z is None:
                z = zc.new_empty((x.shape[0],) + zc.shape[1:])
                z_parts = z.tensor_split(block.chunks)
            z_parts[i].copy_(zc)
            del zc
        norm = block.norm
        if block.statistics():
            var, mean = channel_moments(z_parts)
            _update_running_stats(norm, mean, var, z.numel() // z.shape[1])
        else:
            mean, var = norm.running_mean.clone(), norm.running_var
        invstd = torch.rsqrt(var + norm.eps)
        seed = draw_seed()
        out = None
        keep = block.keeps_tail()
        kept: list[tuple[GradientEdge, GradientEdge]] = []
        for i, zc in enumerate(z_parts):
            x_hat = _normalise(zc, mean, invstd)
            if keep:
                oc, edges = _kept_tail(block, x_hat, chunk_seed(seed, i))
                kept.append(edges)
            else:
                oc = _tail(block, x_hat, chunk_seed(seed, i), grad=False)[1]
            if out is None:
                out = oc.new_empty((x.shape[0],) + oc.shape[1:])
                out_parts = out.tensor_split(block.chunks)
            out_parts[i].copy_(oc)
        return out, mean, invstd, torch.tensor([seed], dtype=torch.int64), kept

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, block = inputs[0], inputs[1]
        _, mean, invstd, seed, kept = output
        ctx.block = block
        ctx.kept = kept     # per chunk: gradient edges of the kept tail graph (empty: recompute)
        ctx.mark_non_differentiable(mean, invstd, seed)
        ctx.save_for_backward(x, mean, invstd, seed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, *_):
        x, mean, invstd, seed = ctx.saved_tensors
        block: ChunkedBlock = ctx.block
        norm = block.norm
        parts = x.tensor_split(block.chunks)
        grads = grad_out.tensor_split(block.chunks)
        seeds = [chunk_seed(int(seed[0]), i) for i in range(len(parts))]
        kept, ctx.kept = ctx.kept or [None] * len(parts), None
        want_x = ctx.needs_input_grad[0]
        grad_x = torch.empty_like(x) if want_x else None
        grad_x_parts = grad_x.tensor_split(block.chunks) if want_x else [None] * len(parts)
        sum_du, sum_du_xhat = torch.zeros_like(mean), torch.zeros_like(mean)
        separable = None if want_x else block.separable_conv_params()
        if block.statistics() and separable is not None:
            sum_du, sum_du_xhat = _one_pass(block, parts, grads, seeds, kept, mean, invstd,
                                            separable)
        elif block.statistics():
            # pass 1: sum(dL/du) and sum(dL/du * x_hat) per channel, which give the two
            # means of g_hat = dL/du * gamma that couple the chunks
            for p, g, s, k in zip(parts, grads, seeds, kept):
                with torch.no_grad():
                    x_hat = _normalise(block.conv(p), mean, invstd)
                du = _tail_grad(block, x_hat, g, s, k, retain=True)   # pass 2 needs it again
                du_c, du_xhat_c = _channel_sums(du, x_hat)
                sum_du += du_c
                sum_du_xhat += du_xhat_c
            positions = x.shape[0] * x_hat.shape[2] * x_hat.shape[3]
            means = _batch_means(norm, mean, sum_du, sum_du_xhat, positions)
            for p, g, s, k, gx in zip(parts, grads, seeds, kept, grad_x_parts):
                _chunk_backward(block, p, g, s, k, mean, invstd, means, gx)
        else:
            # running statistics: dL/dz = g_hat * invstd needs no batch-wide term, one pass
            for p, g, s, k, gx in zip(parts, grads, seeds, kept, grad_x_parts):
                du_c, du_xhat_c = _chunk_backward(block, p, g, s, k, mean, invstd, None, gx)
                sum_du += du_c
                sum_du_xhat += du_xhat_c
        _accumulate(norm.weight, sum_du_xhat)
        _accumulate(norm.bias, sum_du)
        return (grad_x, None) + (None,) * (len(ctx.needs_input_grad) - 2)


def _normalise(zc: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """x_hat = (z - mean) * invstd, as a new tensor."""
    return (zc - _channel(mean)).mul_(_channel(invstd))


def _affine(block: ChunkedBlock, x_hat: Tensor) -> Tensor:
    """u = gamma * x_hat + beta, the norm's output for one chunk, as a new tensor."""
    norm = block.norm
    if norm.weight is not None:
        return torch.addcmul(_channel(norm.bias.detach()), x_hat, _channel(norm.weight.detach()))
    return x_hat.clone()


def _kept_tail(block: ChunkedBlock, x_hat: Tensor, seed: int
               ) -> tuple[Tensor, tuple[GradientEdge, GradientEdge]]:
    """tail(u) for one chunk with its graph kept: (the output, detached; the gradient edges of u
    and of the output). The graph is rooted at u + a scalar leaf, so it holds no reference to u
    or to the output, only what the tail ops save (:meth:`ChunkedBlock.keeps_tail`)."""
    anchor = torch.zeros((), dtype=x_hat.dtype, device=x_hat.device, requires_grad=True)
    with torch.enable_grad():
        u = _affine(block, x_hat) + anchor
        out = block.tail_forward(u, seed, keep=True)
    return out.detach(), (get_gradient_edge(u), get_gradient_edge(out))


def _tail(block: ChunkedBlock, x_hat: Tensor, seed: int, grad: bool) -> tuple[Tensor, Tensor]:
    """(u, tail(u)) for one chunk, u = the norm's output (a grad-requiring leaf when ``grad``);
    ``seed``: the chunk's (:func:`chunk_seed`)."""
    u = _affine(block, x_hat)
    with torch.set_grad_enabled(grad):
        u.requires_grad_(grad)
        return u, block.tail_forward(u.clone() if grad else u, seed)


def _channel_sums(du: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """sum(dL/du) and sum(dL/du * x_hat) per channel of one chunk: (C,) each."""
    return du.sum(dim=(0, 2, 3)), (du * x_hat).sum(dim=(0, 2, 3))


def _tail_grad(block: ChunkedBlock, x_hat: Tensor, grad_out: Tensor, seed: int,
               kept: Optional[tuple[GradientEdge, GradientEdge]] = None,
               retain: bool = False) -> Tensor:
    """dL/du for one chunk, u the norm's output: through the tail graph the forward kept
    (``kept``, its edges; ``retain``: it is used again), else through a recomputed tail."""
    if kept is not None:
        (du,) = torch.autograd.grad([kept[1]], [kept[0]], [grad_out], retain_graph=retain)
        return du
    u, out = _tail(block, x_hat, seed, grad=True)
    (du,) = torch.autograd.grad(out, u, grad_out)
    return du


def _chunk_backward(block: ChunkedBlock, p: Tensor, g: Tensor, seed: int,
                    kept: Optional[tuple[GradientEdge, GradientEdge]], mean: Tensor,
                    invstd: Tensor,
                    means: Optional[tuple[Tensor, Tensor]], grad_x: Optional[Tensor]
                    ) -> tuple[Tensor, Tensor]:
    """Recompute chunk ``p`` with grad through the conv and send dL/dz back through the conv's
    own backward; ``g``: the gradient at the tail's output (``kept``: the chunk's kept tail
    graph, or None), ``means``: the batch-wide means of
    g_hat and g_hat * x_hat (None with running statistics). ``grad_x``: where dL/dp goes (None:
    not wanted). Returns the chunk's sum(dL/du) and sum(dL/du * x_hat) per channel."""
    norm = block.norm
    xc = p.detach().requires_grad_(grad_x is not None)
    with torch.enable_grad():
        zc = block.conv(xc)
    x_hat = _normalise(zc.detach(), mean, invstd)
    du = _tail_grad(block, x_hat, g, seed, kept)
    sums = _channel_sums(du, x_hat)
    grad_z = du * _channel(norm.weight.detach()) if norm.weight is not None else du
    if means is not None:
        grad_z = grad_z.sub_(_channel(means[0])).sub_(x_hat.mul_(_channel(means[1])))
    grad_z.mul_(_channel(invstd))
    del x_hat, du
    torch.autograd.backward(zc, grad_z)
    if grad_x is not None:
        grad_x.copy_(xc.grad)
    return sums


def _gamma(norm: nn.modules.batchnorm._BatchNorm, like: Tensor) -> Tensor:
    """The norm's scale (C,), ones without an affine part."""
    return norm.weight.detach() if norm.weight is not None else torch.ones_like(like)


def _batch_means(norm: nn.modules.batchnorm._BatchNorm, mean: Tensor, sum_du: Tensor,
                 sum_du_xhat: Tensor, positions: int) -> tuple[Tensor, Tensor]:
    """mean(g_hat) and mean(g_hat * x_hat) per channel over the batch's ``positions``, from the
    sums of dL/du and dL/du * x_hat (g_hat = dL/du * gamma)."""
    gamma = _gamma(norm, mean)
    return gamma * sum_du / float(positions), gamma * sum_du_xhat / float(positions)


def _one_pass(block: ChunkedBlock, parts: Sequence[Tensor], grads: Sequence[Tensor],
              seeds: Sequence[int], kept: Sequence[Optional[tuple[GradientEdge, GradientEdge]]],
              mean: Tensor, invstd: Tensor,
              params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Batch statistics, gradients wanted for ``params`` (the conv's separable weight / bias,
    possibly none) and no input gradient: one recomputation per chunk (module doc). Returns
    sum(dL/du) and sum(dL/du * x_hat) per channel; the conv's gradients are accumulated."""
    norm = block.norm
    sum_du, sum_du_xhat = torch.zeros_like(mean), torch.zeros_like(mean)
    terms = [[torch.zeros_like(p) for p in params] for _ in range(3)]   # dW(du), dW(1), dW(x_hat)
    positions = 0
    for p, g, s, k in zip(parts, grads, seeds, kept):
        with torch.enable_grad() if params else torch.no_grad():
            zc = block.conv(p.detach())
        x_hat = _normalise(zc.detach(), mean, invstd)
        du = _tail_grad(block, x_hat, g, s, k)
        du_c, du_xhat_c = _channel_sums(du, x_hat)
        sum_du += du_c
        sum_du_xhat += du_xhat_c
        positions += du.numel() // du.shape[1]
        if params:
            for i, grad_z in enumerate((du, torch.ones_like(du), x_hat)):
                parts_grad = torch.autograd.grad(zc, params, grad_z, retain_graph=i < 2)
                for acc, part in zip(terms[i], parts_grad):
                    acc += part
        del zc, x_hat, du
    gamma = _gamma(norm, mean)
    m1, m2 = _batch_means(norm, mean, sum_du, sum_du_xhat, positions)
    for j, param in enumerate(params):
        shape = (-1,) + (1,) * (param.dim() - 1)
        c = lambda t: t.reshape(shape).to(param.dtype)                      # noqa: E731
        grad = c(invstd) * (c(gamma) * terms[0][j] - c(m1) * terms[1][j] - c(m2) * terms[2][j])
        _accumulate(param, grad)
    return sum_du, sum_du_xhat


def _accumulate(param: Optional[Tensor], grad: Tensor) -> None:
    """param.grad += grad (set when None), for a parameter that wants a gradient."""
    if param is None or not param.requires_grad:
        return
    if param.grad is None:
        param.grad = grad.detach().to(param.dtype).clone()
    else:
        param.grad.add_(grad.to(param.grad.dtype))


def chunked_block(x: Tensor, block: ChunkedBlock) -> Tensor:
    """``block.tail(block.norm(block.conv(x)))`` with the block recomputed chunk by chunk in
    backward. x: (B, C, H, W). Saves x, (C,) statistics and one seed (with
    :meth:`ChunkedBlock.keeps_tail`, also each chunk's tail graph: 1-bit masks, uint8 offsets)."""
    params = [p for m in (block.conv, block.norm, *block.tail) for p in m.parameters()
              if p.requires_grad]
    out, *_ = _ChunkedBlockFunction.apply(x, block, *params)
    return out
