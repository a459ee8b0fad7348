"""The same contracts on CUDA (skipped where no GPU is present)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lance_cl
from lance_cl.core.conv2d import ConvSpec, TuckerConv2dFunction, layout_view
from lance_cl.core.tucker import project, reconstruct

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda"


@pytest.mark.parametrize("groups,stride,layout", [(1, 1, "tensor"), (4, 2, "tensor"),
                                                  (1, 2, "patch"), (2, 1, "patch")])
def test_cuda_conv_weight_gradient_is_that_of_the_reconstruction(groups, stride, layout):
    g = torch.Generator().manual_seed(0)
    spec = ConvSpec.build((3, 3), stride, 1, 1, groups)
    x = torch.randn(4, 8, 10, 10, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    w = torch.randn(8, 8 // groups, 3, 3, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    view = layout_view(x.detach(), (3, 3), spec, layout)
    factors = [None] + [torch.linalg.qr(torch.randn(n, max(1, n // 2), dtype=torch.float64,
                                                    device=DEV))[0] for n in view.shape[1:]]
    y, _ = TuckerConv2dFunction.apply(x, w, None, spec, layout, *factors)
    gy = torch.randn_like(y)
    y.backward(gy)
    x_hat = reconstruct(project(view, factors), factors)
    w2 = w.detach().clone().requires_grad_()
    if layout == "tensor":
        F.conv2d(x_hat, w2, None, spec.stride, spec.padding, spec.dilation, groups).backward(gy)
    else:
        b, f, l = x_hat.shape
        out = torch.einsum("bgfl,gof->bgol", x_hat.reshape(b, groups, f // groups, l),
                           w2.reshape(groups, 8 // groups, -1)).reshape(b, 8, l)
        out.backward(gy.flatten(2))
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-9, atol=1e-9)
    x2 = x.detach().clone().requires_grad_()
    F.conv2d(x2, w.detach(), None, spec.stride, spec.padding, spec.dilation, groups).backward(gy)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_gradients_follow_vanilla_autocast(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=16),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).to(DEV)
    ref = copy.deepcopy(model)
    x = torch.randn(32, 3, 8, 8, device=DEV)
    lance_cl.compress(model, "lance", eps=1.0)
    lance_cl.calibrate(model, [torch.randn(64, 3, 8, 8, device=DEV) for _ in range(8)],
                       progress=False)
    with torch.autocast("cuda", dtype=dtype):
        out, ref_out = model(x), ref(x)
    torch.testing.assert_close(out, ref_out)          # forward stays exact under autocast
    out.float().square().mean().backward()
    ref_out.float().square().mean().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32
        assert F.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0) > 0.99


def test_cuda_measured_memory_and_peak():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).to(DEV)
    x = torch.randn(128, 256, device=DEV)
    vanilla = lance_cl.measure_activation_memory(model, x, lambda o: o.sum(), layers=["0", "2"])
    assert vanilla["selected"] == 2 * 128 * 256 * 4
    assert vanilla["cuda_peak"] is not None and vanilla["cuda_peak"] > 0
    lance_cl.compress(model, "lance", rank=8)
    lance_cl.calibrate(model, [torch.randn(128, 256, device=DEV)], progress=False)
    stats = lance_cl.measure_activation_memory(model, x, lambda o: o.sum())
    assert stats["selected"] == sum(r.bytes_after for r in lance_cl.report(model))


@pytest.mark.parametrize("k,s,p,ceil", [(2, None, 0, False), (3, 2, 1, True)])
def test_cuda_compact_ops_give_autograds_gradients(k, s, p, ceil):
    """The compact activation, max-pool (the scatter backward) and dropout on CUDA."""
    from lance_cl.core.compact import compact_dropout, compact_max_pool2d, masked_activation

    x = torch.randn(2, 3, 9, 11, device=DEV, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 9, 11, device=DEV, dtype=torch.float64)
    y = masked_activation(x * 1, "hardtanh", 0.0, 6.0)
    expected = F.relu6(x * 1)
    assert torch.equal(y, expected)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(expected, x, g)[0])
    y = compact_max_pool2d(x, k, s, p, 1, ceil)
    expected = F.max_pool2d(x, k, s, p, 1, ceil)
    go = torch.randn(expected.shape, device=DEV, dtype=torch.float64)
    assert torch.equal(y, expected)
    torch.testing.assert_close(torch.autograd.grad(y, x, go)[0],
                               torch.autograd.grad(expected, x, go)[0], rtol=1e-15, atol=1e-14)
    y = compact_dropout(x, 0.3, seed=7)
    mask = y.detach() != 0
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g * mask / 0.7, rtol=1e-15, atol=0)
