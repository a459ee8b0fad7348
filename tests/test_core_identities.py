"""The identities of docs/core.md for compressed Linear and Conv2d, against vanilla autograd in float64.

1. Full ranks: grad_weight equals vanilla autograd.
2. Any ranks: grad_weight equals the exact gradient for the reconstructed input x_hat.
3. Batch mode uncompressed, only the fan-in mode projected with P = U U^T: dW = dW_full P.
4. Autograd keeps no tensor of x's size.
Output, grad_input and grad_bias are exact in every case.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from lance_cl.core.conv2d import ConvSpec, TuckerConv2dFunction, layout_view
from lance_cl.core.linear import TuckerLinearFunction
from lance_cl.core.tucker import project, reconstruct

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def orthonormal(n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=DT))
    return q[:, :r].contiguous()


def random_factors(shape, compress_batch: bool, full: bool, seed: int = 0):
    factors = []
    for m, n in enumerate(shape):
        if m == 0 and not compress_batch:
            factors.append(None)
        else:
            factors.append(orthonormal(n, n if full else max(1, (n + 1) // 2), seed + m))
    return factors


def saved_tensors_of(fn):
    """Run fn() under saved-tensor hooks; return the list of saved tensors."""
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


# ---------------------------------------------------------------------------------------------
# Linear

LINEAR_SHAPES = [(6, 5), (4, 3, 5), (3, 2, 4, 5)]


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("compress_batch", [False, True])
@pytest.mark.parametrize("full", [True, False])
def test_linear_identities_1_2(shape, compress_batch, full):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=DT, requires_grad=True)
    w = torch.randn(7, shape[-1], dtype=DT, requires_grad=True)
    b = torch.randn(7, dtype=DT, requires_grad=True)
    factors = random_factors(shape, compress_batch, full)
    y, _ = TuckerLinearFunction.apply(x, w, b, *factors)
    gy = torch.randn_like(y)
    y.backward(gy)

    # independent truth: vanilla autograd on the real x (output, grad_input, grad_bias) ...
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y2 = F.linear(x2, w2, b2)
    y2.backward(gy)
    torch.testing.assert_close(y, y2, **TOL)
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    torch.testing.assert_close(b.grad, b2.grad, **TOL)
    # ... and on x_hat for the weight gradient (identity 2; identity 1 when full).
    x_hat = reconstruct(project(x.detach(), factors), factors)
    w3 = w.detach().clone().requires_grad_()
    F.linear(x_hat, w3).backward(gy)
    torch.testing.assert_close(w.grad, w3.grad, **TOL)
    if full:
        torch.testing.assert_close(w.grad, w2.grad, **TOL)


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_identity_3_projected_gradient(shape):
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=DT)
    w = torch.randn(3, shape[-1], dtype=DT, requires_grad=True)
    u = orthonormal(shape[-1], 2, 7)
    factors = [None] * (len(shape) - 1) + [u]
    y, _ = TuckerLinearFunction.apply(x, w, None, *factors)
    gy = torch.randn_like(y)
    y.backward(gy)
    dw_full = gy.reshape(-1, 3).t() @ x.reshape(-1, shape[-1])
    torch.testing.assert_close(w.grad, dw_full @ (u @ u.t()), **TOL)


@pytest.mark.parametrize("rows,rank", [(3, 20), (200, 5)], ids=["rank_above_rows", "rank_below_rows"])
def test_linear_weight_gradient_in_either_contraction_order(rows, rank):
    """The fan-in factor lifts the core (rank above the rows) or the (O, r) product: both are
    the weight gradient of x_hat (identity 2), checked against plain autograd on x_hat."""
    torch.manual_seed(2)
    x = torch.randn(rows, 40, dtype=DT)
    w = torch.randn(50, 40, dtype=DT, requires_grad=True)
    factors = [None, orthonormal(40, rank, 3)]
    y, _ = TuckerLinearFunction.apply(x, w, None, *factors)
    gy = torch.randn_like(y)
    y.backward(gy)
    w2 = w.detach().clone().requires_grad_()
    F.linear(reconstruct(project(x, factors), factors), w2).backward(gy)
    torch.testing.assert_close(w.grad, w2.grad, **TOL)


def test_linear_identity_4_x_not_saved():
    x = torch.randn(64, 256, dtype=DT, requires_grad=True)
    w = torch.randn(32, 256, dtype=DT, requires_grad=True)
    factors = [None, orthonormal(256, 8, 0)]
    _, saved = saved_tensors_of(lambda: TuckerLinearFunction.apply(x, w, None, *factors))
    assert saved, "the Function must save its core"
    for t in saved:
        assert t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        assert t.untyped_storage().nbytes() < x.untyped_storage().nbytes() or t is w
    assert any(tuple(t.shape) == (64, 8) for t in saved)


def test_linear_gradcheck_full_rank():
    x = torch.randn(3, 2, 4, dtype=DT, requires_grad=True)
    w = torch.randn(5, 4, dtype=DT, requires_grad=True)
    b = torch.randn(5, dtype=DT, requires_grad=True)
    factors = [None, orthonormal(2, 2, 0), orthonormal(4, 4, 1)]
    assert torch.autograd.gradcheck(
        lambda x, w, b: TuckerLinearFunction.apply(x, w, b, *factors)[0], (x, w, b))


# ---------------------------------------------------------------------------------------------
# Conv2d

# (C_in, C_out, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (4, 6, 3, 1, 1, 1, 1),
    (4, 6, 3, 2, 1, 1, 1),
    (4, 6, 3, 2, 0, 2, 1),          # stride = dilation != 1
    (4, 6, 2, 1, "same", 1, 1),     # even kernel: asymmetric 'same'
    (4, 6, 3, 1, "same", 2, 1),
    (4, 6, 3, 1, (1, 0, 2, 1), 1, 1),   # asymmetric (left, right, top, bottom)
    (4, 6, (3, 1), (2, 1), (1, 0), (1, 2), 1),
    (4, 8, 3, 1, 1, 1, 2),          # 1 < groups < C
    (6, 6, 3, 2, 1, 1, 6),          # depthwise
    (4, 8, 3, 1, 1, 1, 4),          # depthwise with channel multiplier 2
    (4, 6, 1, 1, 0, 1, 1),          # pointwise
]


def conv_setup(case, batch=3, hw=(9, 8), seed=0):
    c_in, c_out, k, s, p, d, g = case
    k = (k, k) if isinstance(k, int) else k
    spec = ConvSpec.build(k, s, p, d, g)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, *hw, generator=gen, dtype=DT, requires_grad=True)
    w = torch.randn(c_out, c_in // g, *k, generator=gen, dtype=DT, requires_grad=True)
    b = torch.randn(c_out, generator=gen, dtype=DT, requires_grad=True)
    return spec, k, x, w, b


def reference_conv(x, w, b, case):
    """The plain module the compressed layer must match (nn.Conv2d semantics / F.pad first)."""
    c_in, c_out, k, s, p, d, g = case
    if isinstance(p, tuple) and len(p) == 4:
        return F.conv2d(F.pad(x, p), w, b, s, 0, d, g)
    return F.conv2d(x, w, b, s, p, d, g)


def weight_grad_of(x_input, w, gy, spec, layout, kernel):
    """Exact weight gradient for the (pre-padded) input x_input, by vanilla autograd."""
    w2 = w.detach().clone().requires_grad_()
    if layout == "tensor":
        y = F.conv2d(x_input, w2, None, spec.stride, spec.padding, spec.dilation, spec.groups)
        y.backward(gy)
        return w2.grad
    # patch layout: x_input is the (possibly reconstructed) im2col tensor (B, C*kh*kw, L)
    b, f, l = x_input.shape
    g = spec.groups
    xg = x_input.reshape(b, g, f // g, l)
    wg = w2.reshape(g, w2.shape[0] // g, -1)
    y = torch.einsum("bgfl,gof->bgol", xg, wg).reshape(b, w2.shape[0], l)
    y.backward(gy.flatten(2))
    return w2.grad


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("layout", ["tensor", "patch"])
@pytest.mark.parametrize("compress_batch,full", [(False, True), (True, True), (False, False),
                                                 (True, False)])
def test_conv_identities_1_2(case, layout, compress_batch, full):
    spec, k, x, w, b = conv_setup(case)
    xp = spec.apply_pre_pad(x)
    view = layout_view(xp.detach(), k, spec, layout)
    factors = random_factors(view.shape, compress_batch, full, seed=3)
    y, _ = TuckerConv2dFunction.apply(xp, w, b, spec, layout, *factors)
    gy = torch.randn_like(y)
    y.backward(gy)

    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y2 = reference_conv(x2, w2, b2, case)
    y2.backward(gy)
    torch.testing.assert_close(y, y2, **TOL)
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    torch.testing.assert_close(b.grad, b2.grad, **TOL)

    x_hat = reconstruct(project(view, factors), factors)
    torch.testing.assert_close(w.grad, weight_grad_of(x_hat, w, gy, spec, layout, k), **TOL)
    if full:
        torch.testing.assert_close(w.grad, w2.grad, **TOL)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[-1] == 1])
@pytest.mark.parametrize("layout", ["tensor", "patch"])
def test_conv_identity_3_projected_gradient(case, layout):
    spec, k, x, w, _ = conv_setup(case, seed=5)
    xp = spec.apply_pre_pad(x.detach())
    view = layout_view(xp, k, spec, layout)
    fan_in = view.shape[1]
    u = orthonormal(fan_in, max(1, fan_in // 3), 11)
    factors = [None, u] + [None] * (view.dim() - 2)
    y, _ = TuckerConv2dFunction.apply(xp, w, None, spec, layout, *factors)
    gy = torch.randn_like(y)
    y.backward(gy)
    dw_full = weight_grad_of(xp, w, gy, spec, "tensor", k)
    p = u @ u.t()
    if layout == "patch":   # fan-in axis C*kh*kw of weight.view(C_out, -1)
        expected = (dw_full.reshape(w.shape[0], -1) @ p).reshape(w.shape)
    else:                   # fan-in axis C of the tensor layout
        expected = torch.einsum("ochw,cd->odhw", dw_full, p)
    torch.testing.assert_close(w.grad, expected, **TOL)


@pytest.mark.parametrize("layout", ["tensor", "patch"])
def test_conv_identity_4_x_not_saved(layout):
    spec, k, x, w, b = conv_setup((8, 16, 3, 1, 1, 1, 1), batch=8, hw=(16, 16))
    view = layout_view(x.detach(), k, spec, layout)
    factors = [None] + [orthonormal(n, 2, m) for m, n in enumerate(view.shape[1:], 1)]
    _, saved = saved_tensors_of(
        lambda: TuckerConv2dFunction.apply(x, w, b, spec, layout, *factors))
    x_bytes = x.untyped_storage().nbytes()
    for t in saved:
        if t is w:
            continue
        assert t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        assert t.untyped_storage().nbytes() < x_bytes / 4


def test_conv_gradcheck_full_rank_strided_grouped():
    case = (4, 4, 3, 2, 1, 1, 2)
    spec, k, x, w, b = conv_setup(case, batch=2, hw=(5, 5))
    view = layout_view(x.detach(), k, spec, "tensor")
    factors = random_factors(view.shape, False, True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: TuckerConv2dFunction.apply(x, w, b, spec, "tensor", *factors)[0],
        (x, w, b))
