"""Conv2d with a compressed backward: exact output and grad_input, grad_weight from a Tucker core.

Two layouts (docs/core.md):

* ``"tensor"``: modes (B, C, H, W) of the (padded) input, as in the ASI/HOSVD/LANCE fine-tuning papers.
* ``"patch"``: modes (B, C*kh*kw, L) of the im2col-unfolded input, L = output positions, as in GPM.
  Mode 1 is exactly the fan-in axis of ``weight.view(C_out, -1)``.

Also the gradient-filtering Function (Yang et al. 2023), which saves an R x R block-averaged input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.grad import conv2d_weight

from .tucker import mode_contract, mode_product, project, reconstruct

LAYOUTS = ("tensor", "patch")
Padding = Union[str, int, Sequence[int]]


def _pair(v: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return v  # type: ignore[return-value]


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of a conv call with symmetric padding; asymmetric padding is applied by ``pre_pad``.

    ``pre_pad`` is F.pad's (left, right, top, bottom), applied (as an ordinary autograd op that
    saves nothing) before the compressed conv, so the Function itself only sees symmetric padding.
    """

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pre_pad: Optional[tuple[int, int, int, int]] = None
    pad_mode: str = "constant"

    @staticmethod
    def build(
        kernel_size: Sequence[int], stride=1, padding: Padding = 0, dilation=1, groups: int = 1,
        padding_mode: str = "zeros",
    ) -> "ConvSpec":
        """Normalise nn.Conv2d-style arguments. ``padding`` may be int, (ph, pw),
        (left, right, top, bottom), 'same' or 'valid'; ``padding_mode`` as in nn.Conv2d."""
        stride, dilation = _pair(stride), _pair(dilation)
        kh, kw = _pair(tuple(kernel_size))
        if isinstance(padding, str):
            if padding == "valid":
                lrtb = (0, 0, 0, 0)
            elif padding == "same":
                if stride != (1, 1):
                    raise ValueError("padding='same' is not supported for strided convolutions "
                                     "(same rule as torch.nn.Conv2d); give explicit padding")
                th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
                lrtb = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
            else:
                raise ValueError(f"padding={padding!r}: use an int, a pair, a 4-tuple, 'same' or 'valid'")
        else:
            pad = tuple(int(p) for p in ((padding,) if isinstance(padding, int) else padding))
            if len(pad) == 1:
                pad = pad * 2
            if len(pad) == 2:
                lrtb = (pad[1], pad[1], pad[0], pad[0])
            elif len(pad) == 4:
                lrtb = pad  # type: ignore[assignment]
            else:
                raise ValueError(f"padding={padding!r}: use an int, a pair, a 4-tuple, 'same' or 'valid'")
        left, right, top, bottom = lrtb
        mode = {"zeros": "constant"}.get(padding_mode, padding_mode)
        if mode == "constant" and left == right and top == bottom:
            return ConvSpec(stride, (top, left), dilation, int(groups))
        # Asymmetric or non-zero padding: pad explicitly, convolve without padding.
        return ConvSpec(stride, (0, 0), dilation, int(groups), (left, right, top, bottom), mode)

    def apply_pre_pad(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> padded input the Function convolves (unchanged if no pre-pad)."""
        if self.pre_pad is None:
            return x
        return F.pad(x, self.pre_pad, mode=self.pad_mode)

    def output_size(self, height: int, width: int, kernel_size: Sequence[int]) -> tuple[int, int]:
        """Output (H', W') for a (pre-padded) input of (height, width)."""
        out = []
        for n, k, s, p, d in zip((height, width), kernel_size, self.stride, self.padding, self.dilation):
            out.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
        return out[0], out[1]


def layout_view(x: Tensor, kernel_size: Sequence[int], conv: ConvSpec, layout: str) -> Tensor:
    """The activation in the modes a layout compresses. x: (B, C, H, W) already pre-padded.

    tensor -> x itself; patch -> im2col (B, C*kh*kw, L). Used for calibration and per-step
    decompositions; the training path never materialises the patches when the fan-in mode is projected.
    """
    if layout == "tensor":
        return x
    if layout == "patch":
        return F.unfold(x, tuple(kernel_size), conv.dilation, conv.padding, conv.stride)
    raise ValueError(f"layout={layout!r}: choose one of {LAYOUTS}")


def layout_shape(x_shape: Sequence[int], kernel_size: Sequence[int], conv: ConvSpec,
                 layout: str) -> tuple[int, ...]:
    """Mode sizes of :func:`layout_view` for an input of ``x_shape`` (pre-padded)."""
    b, c, h, w = x_shape
    if layout == "tensor":
        return (b, c, h, w)
    ho, wo = conv.output_size(h, w, kernel_size)
    return (b, c * kernel_size[0] * kernel_size[1], ho * wo)


def conv_core(x: Tensor, kernel_size: Sequence[int], conv: ConvSpec, layout: str,
              factors: Sequence[Optional[Tensor]]) -> Tensor:
    """Tucker core of the input in ``layout``. x: (B, C, H, W) pre-padded."""
    if layout == "tensor":
        return project(x, factors)
    u_batch, u_fan_in, u_pos = factors
    if u_fan_in is None:
        patches = layout_view(x, kernel_size, conv, "patch")
    else:
        # U_F^T applied to every im2col column is a convolution with U_F^T as the kernel.
        kernel = u_fan_in.t().reshape(u_fan_in.shape[1], x.shape[1], *kernel_size).to(x.dtype)
        patches = F.conv2d(x, kernel, None, conv.stride, conv.padding, conv.dilation).flatten(2)
    return project(patches, (u_batch, None, u_pos))


def lift_grouped(m: Tensor, basis: Tensor, groups: int) -> Tensor:
    """Map a fan-in-rank gradient back to the full fan-in, respecting groups.

    m: (C_out, r, *rest) with rest the kernel taps (or nothing); basis: (F, r) spanning all groups'
    fan-in. Returns (C_out, F // groups, *rest): dW[o, j] = sum_r basis[g(o) * F/groups + j, r] m[o, r].
    """
    c_out, r = m.shape[:2]
    rest = m.shape[2:]
    if groups == 1:
        return torch.einsum("or...,fr->of...", m, basis)
    mg = m.reshape(groups, c_out // groups, r, -1)
    bg = basis.reshape(groups, basis.shape[0] // groups, r)
    out = torch.einsum("gork,gfr->gofk", mg, bg)
    return out.reshape(c_out, basis.shape[0] // groups, *rest)


def block_diagonal(m: Tensor, groups: int) -> Tensor:
    """Keep each output channel's own group of a full (C_out, F) cross term -> (C_out, F // groups)."""
    if groups == 1:
        return m
    c_out, f = m.shape
    blocks = m.reshape(groups, c_out // groups, groups, f // groups)
    return torch.diagonal(blocks, dim1=0, dim2=2).permute(2, 0, 1).reshape(c_out, f // groups)


SMALL_PATCH = 32   # r * kh * kw up to which the rank-space weight gradient uses im2col + matmul


def conv2d_input_grad(x_shape: Sequence[int], weight: Tensor, grad_output: Tensor,
                      conv: ConvSpec) -> Tensor:
    """Exact grad_input of conv2d; needs only the input's shape (the dummy input is never read,
    and a contiguous one is faster than ``torch.nn.grad.conv2d_input``'s stride-0 dummy)."""
    dummy = torch.empty(x_shape, dtype=grad_output.dtype, device=grad_output.device)
    grad_input, _, _ = torch.ops.aten.convolution_backward(
        grad_output, dummy, weight, None, list(conv.stride), list(conv.padding),
        list(conv.dilation), False, [0, 0], conv.groups, [True, False, False])
    return grad_input


def tucker_conv2d_grad_weight(core: Tensor, factors: Sequence[Optional[Tensor]], grad_output: Tensor,
                              weight_shape: Sequence[int], conv: ConvSpec, layout: str) -> Tensor:
    """Exact weight gradient for the reconstructed input x_hat, computed without rebuilding x_hat.

    grad_output: (B, C_out, H', W'). Returns (C_out, C/groups, kh, kw).
    """
    c_out, c_group, kh, kw = weight_shape
    if layout == "patch":
        u_batch, u_fan_in, u_pos = factors
        gy = project(grad_output.flatten(2), (u_batch, None, u_pos))  # (N, C_out, l)
        m = mode_contract(gy, core, 1)                                      # (C_out, f)
        dw = lift_grouped(m, u_fan_in, conv.groups) if u_fan_in is not None \
            else block_diagonal(m, conv.groups)
        return dw.reshape(weight_shape)

    u_batch, u_chan = factors[0], factors[1]
    gy = grad_output if u_batch is None else mode_product(grad_output, u_batch.t(), 0)
    z = reconstruct(core, factors, modes=(2, 3))                            # (N, c, H, W)
    if u_chan is not None and u_chan.shape[1] <= c_group:
        # Correlate in channel-rank space, then lift: r channels instead of C (ASI eq. 15).
        r = u_chan.shape[1]
        if r * kh * kw <= SMALL_PATCH:
            # a handful of input channels: one matmul against the im2col patches beats the
            # convolution kernel (measured 2-3x on CPU, docs/performance.md)
            patches = layout_view(z, (kh, kw), conv, "patch")
            m = mode_contract(gy.flatten(2), patches, 1).reshape(c_out, r, kh, kw)
        else:
            m = conv2d_weight(z, (c_out, r, kh, kw), gy, conv.stride, conv.padding,
                              conv.dilation, 1)
        return lift_grouped(m, u_chan, conv.groups)
    if u_chan is not None:
        # Grouped/depthwise with rank above the group width: rebuild channels, use the grouped
        # (direct) weight gradient rather than a dense channel-by-channel cross term.
        z = mode_product(z, u_chan, 1)
    return conv2d_weight(z, weight_shape, gy, conv.stride, conv.padding, conv.dilation, conv.groups)


def _grad_input_and_bias(ctx, grad_output: Tensor, weight: Tensor):
    grad_input = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = conv2d_input_grad(ctx.x_shape, weight.to(grad_output.dtype), grad_output,
                                       ctx.conv).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_output.sum((0, 2, 3)).to(ctx.bias_dtype)
    return grad_input, grad_bias


def _setup_common(ctx, x: Tensor, bias: Optional[Tensor], conv: ConvSpec) -> None:
    ctx.conv = conv
    ctx.x_shape = tuple(x.shape)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


class TuckerConv2dFunction(torch.autograd.Function):
    """conv2d(x, W, b) that saves only the Tucker core of x (plus references to its factors).

    Inputs: x (B, C, H, W) pre-padded, weight (C_out, C/g, kh, kw), bias (C_out,) or None,
    conv: ConvSpec, layout: "tensor" | "patch", then one factor (n_m, r_m) or None per layout mode.
    Outputs: (y, core); the core is non-differentiable and returned only so it can be saved.
    """

    @staticmethod
    def forward(x, weight, bias, conv, layout, *factors):
        out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        core = conv_core(x, weight.shape[-2:], conv, layout, factors)
        return out, core

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, conv, layout, *factors = inputs
        _, core = output
        ctx.mark_non_differentiable(core)
        ctx.save_for_backward(core, weight, *factors)
        _setup_common(ctx, x, bias, conv)
        ctx.layout = layout

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_core):
        core, weight, *factors = ctx.saved_tensors
        grad_input, grad_bias = _grad_input_and_bias(ctx, grad_output, weight)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            work = torch.promote_types(core.dtype, weight.dtype)
            factors = [None if u is None else u.to(work) for u in factors]
            grad_weight = tucker_conv2d_grad_weight(core.to(work), factors, grad_output.to(work),
                                                    weight.shape, ctx.conv, ctx.layout)
            grad_weight = grad_weight.to(weight.dtype)
        return (grad_input, grad_weight, grad_bias, None, None) + (None,) * len(factors)


def _block_sum(t: Tensor, rows: int, cols: int, block_h: int, block_w: int) -> Tensor:
    """Zero-fill or crop (B, C, H, W) to (rows*block_h, cols*block_w), then sum each block."""
    th, tw = rows * block_h, cols * block_w
    t = t[..., :th, :tw]
    t = F.pad(t, (0, tw - t.shape[-1], 0, th - t.shape[-2]))
    return F.avg_pool2d(t, (block_h, block_w), divisor_override=1)


def filter_blocks(out_hw: Sequence[int], radius: int) -> tuple[int, int]:
    """Number of R x R output blocks along (H', W') (the last ones may be partial)."""
    return math.ceil(out_hw[0] / radius), math.ceil(out_hw[1] / radius)


def filtered_input(x: Tensor, conv: ConvSpec, out_hw: Sequence[int], radius: int) -> Tensor:
    """Block means of the zero-padded input under each R x R block of output positions.

    Output block (i, j) anchors its receptive fields at padded-input rows [i R s_h, (i+1) R s_h)
    and columns likewise; the mean over that region stands for every kernel tap.
    x: (B, C, H, W) pre-padded -> (B, C, ceil(H'/R), ceil(W'/R)).
    """
    ph, pw = conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    rows, cols = filter_blocks(out_hw, radius)
    bh, bw = radius * conv.stride[0], radius * conv.stride[1]
    return (_block_sum(xp, rows, cols, bh, bw) / (bh * bw)).contiguous()


def filtered_grad_weight(x_blocks: Tensor, grad_output: Tensor, weight_shape: Sequence[int],
                         groups: int, radius: int) -> Tensor:
    """Gradient-filter weight gradient: sum over blocks of (sum of gy) x (mean of x), same for
    every tap. x_blocks: (B, C, Hb, Wb); grad_output: (B, C_out, H', W') -> (C_out, C/g, kh, kw)."""
    c_out, c_group, kh, kw = weight_shape
    rows, cols = x_blocks.shape[-2:]
    gy = _block_sum(grad_output, rows, cols, radius, radius)
    b = gy.shape[0]
    gy = gy.reshape(b, groups, c_out // groups, -1)
    xb = x_blocks.reshape(b, groups, c_group, -1)
    m = torch.einsum("bgop,bgcp->goc", gy, xb).reshape(c_out, c_group, 1, 1)
    return m.expand(c_out, c_group, kh, kw).contiguous()


class GradientFilterConv2dFunction(torch.autograd.Function):
    """conv2d that saves only the R x R block means of its input (gradient filtering, R = radius).

    grad_input and grad_bias stay exact; grad_weight is the filtered approximation.
    Inputs: x (B, C, H, W) pre-padded, weight, bias or None, conv: ConvSpec, radius: int.
    """

    @staticmethod
    def forward(x, weight, bias, conv, radius):
        out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return out, filtered_input(x, conv, out.shape[-2:], radius)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, conv, radius = inputs
        _, x_blocks = output
        ctx.mark_non_differentiable(x_blocks)
        ctx.save_for_backward(x_blocks, weight)
        _setup_common(ctx, x, bias, conv)
        ctx.radius = radius

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_blocks):
        x_blocks, weight = ctx.saved_tensors
        grad_input, grad_bias = _grad_input_and_bias(ctx, grad_output, weight)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            work = torch.promote_types(x_blocks.dtype, weight.dtype)
            grad_weight = filtered_grad_weight(x_blocks.to(work), grad_output.to(work), weight.shape,
                                               ctx.conv.groups, ctx.radius).to(weight.dtype)
        return grad_input, grad_weight, grad_bias, None, None
