"""Compact saved tensors: each op against plain autograd in float64, what autograd really keeps,
and the model-level API on torchvision / Avalanche models."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import lance_cl
from lance_cl.core.compact import (compact_batch_norm, compact_dropout, compact_max_pool2d,
                                   fast_max_pool2d, masked_activation, multiply_by_mask,
                                   pack_bits, packed_nbytes, recompute_segment, unpack_bits,
                                   unpack_factor)


def saved_storages(fn) -> list[tuple[tuple[int, ...], torch.dtype, int]]:
    """(shape, dtype, storage bytes) of every tensor autograd saves while ``fn()`` runs."""
    seen: dict[int, tuple] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.dtype, t.untyped_storage().nbytes())
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(seen.values())


def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


# -- bit packing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 7), (2, 16)])
def test_pack_bits_round_trip_and_size(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(mask.numel())
    assert torch.equal(unpack_bits(packed, shape), mask)
    # bit i of byte k is element 8k + i, by hand for the first byte
    first = mask.reshape(-1)[:8].tolist()
    assert int(packed[0]) == sum(1 << i for i, b in enumerate(first) if b)
    # the CPU's numpy packing and the multiply-gather other devices use give the same bytes
    from lance_cl.core.compact.bitpack import _pack_by_multiply

    assert torch.equal(_pack_by_multiply(mask), packed)
    assert torch.equal(pack_bits(mask.transpose(0, -1)), _pack_by_multiply(mask.transpose(0, -1)))


# -- activations -------------------------------------------------------------------------------------

ACTIVATIONS = [
    ("relu", lambda t: F.relu(t), dict(kind="hardtanh", a=0.0, b=float("inf"))),
    ("relu6", lambda t: F.relu6(t), dict(kind="hardtanh", a=0.0, b=6.0)),
    ("hardtanh", lambda t: F.hardtanh(t, -1.5, 2.0), dict(kind="hardtanh", a=-1.5, b=2.0)),
    ("leaky", lambda t: F.leaky_relu(t, 0.1), dict(kind="leaky_relu", a=0.1)),
    ("hardtanh_open", lambda t: F.hardtanh(t, -1.5, float("inf")),
     dict(kind="hardtanh", a=-1.5, b=float("inf"))),
]


@pytest.mark.parametrize("name,ref,spec", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
@pytest.mark.parametrize("inplace", [False, True])
def test_masked_activation_matches_autograd(name, ref, spec, inplace):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 4, 5, generator=gen, dtype=torch.float64) * 4)
    x[0, 0, :3] = torch.tensor([0.0, 6.0, -1.5], dtype=torch.float64)   # the kinks
    x.requires_grad_()
    g = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    inp = x.clone() if inplace else x * 1.0
    y = masked_activation(inp, inplace=inplace, **spec)
    expected = ref(x * 1.0)
    assert torch.equal(y, expected)
    assert torch.equal(grads(y, x, g)[0], grads(expected, x, g)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_masked_activation_mask_is_pytorchs_in_every_dtype_and_layout(dtype, layout):
    """float32 / float64 contiguous inputs are compared by numpy, the rest by PyTorch: both give
    PyTorch's gradient, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    base = (torch.randn(6, 5, 4, generator=gen) * 4).to(dtype)
    base[0, 0, :3] = torch.tensor([0.0, 6.0, -1.5]).to(dtype)
    g = torch.randn(6, 5, 4, generator=gen).to(dtype)
    for name, ref, spec in ACTIVATIONS:
        x = (base.transpose(0, 2) if layout == "transposed" else base).clone().requires_grad_()
        gx = g.transpose(0, 2) if layout == "transposed" else g
        y = masked_activation(x * 1, **spec)
        expected = ref(x * 1)
        assert torch.equal(y, expected), name
        assert torch.equal(grads(y, x, gx)[0], grads(expected, x, gx)[0]), name


def test_masked_activation_saves_only_bits():
    x = torch.randn(64, 32, requires_grad=True)
    saved = saved_storages(lambda: masked_activation(x * 1.0, "hardtanh"))
    assert saved == [((256,), torch.uint8, 256)]   # 2048 elements / 8


def test_compact_backward_is_once_differentiable():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = masked_activation(x * 1.0, "hardtanh")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


# -- max pooling --------------------------------------------------------------------------------------

POOL_GRID = [(k, s, p, d, c) for k, s, p, d, c in itertools.product(
    [2, 3, (2, 3)], [None, 1, 2, 3], [0, 1], [1, 2], [False, True])
    if (p <= (k if isinstance(k, int) else min(k)) // 2)]


@pytest.mark.parametrize("k,s,p,d,ceil", POOL_GRID)
def test_max_pool_matches_autograd(k, s, p, d, ceil):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64)
    x[0, 0, :4, :4] = 1.0   # ties: the same index as PyTorch's kernel must win
    x.requires_grad_()
    expected = F.max_pool2d(x, k, s, p, d, ceil)
    y = compact_max_pool2d(x, k, s, p, d, ceil)
    assert torch.equal(y, expected)
    assert torch.equal(fast_max_pool2d(x.detach(), k, s, p, d, ceil), expected)   # no-grad path
    g = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    # overlapping windows add in another order than PyTorch's scatter: equal to rounding
    torch.testing.assert_close(grads(y, x, g)[0], grads(expected, x, g)[0], rtol=1e-15, atol=1e-14)


@pytest.mark.parametrize("k,s,p,d,ceil", [(2, None, 0, 1, False), (3, 2, 1, 1, True),
                                          ((2, 3), 1, 1, 2, False)])
def test_max_pool_scatter_backward_matches_autograd(monkeypatch, k, s, p, d, ceil):
    """The backward other devices take (scatter-add of the rebuilt indices), run on a CPU."""
    from lance_cl.core.compact import pooling

    monkeypatch.setattr(pooling, "_reads_input_shape_only", lambda device: False)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    expected = F.max_pool2d(x, k, s, p, d, ceil)
    y = compact_max_pool2d(x, k, s, p, d, ceil)
    g = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(grads(y, x, g)[0], grads(expected, x, g)[0], rtol=1e-15, atol=1e-14)


@pytest.mark.parametrize("width", [3, 4, 5, 9])
def test_max_pool_with_unequal_dilations_matches_autograd(width):
    """Windows that reach a whole row further than the row is wide (kernel (2, 3), dilation
    (1, 2)) on narrow inputs, where flat-index differences of two window positions can coincide."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 6, width, generator=gen, dtype=torch.float64, requires_grad=True)
    args = ((2, 3), 1, (0, 1), (1, 2), False)
    expected = F.max_pool2d(x, *args)
    y = compact_max_pool2d(x, *args)
    assert torch.equal(y, expected)
    g = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(grads(y, x, g)[0], grads(expected, x, g)[0], rtol=1e-15, atol=1e-14)


def test_max_pool_unbatched_and_saved_offsets():
    x = torch.randn(3, 8, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 4, dtype=torch.float64)
    assert torch.equal(grads(compact_max_pool2d(x, 2), x, g)[0], grads(F.max_pool2d(x, 2), x, g)[0])
    x4 = torch.randn(64, 16, 12, 12, requires_grad=True)
    saved = saved_storages(lambda: compact_max_pool2d(x4 * 1.0, 2))
    assert saved == [((64, 16, 6, 6), torch.uint8, 64 * 16 * 36)]   # 1/16 of x's float32 bytes


# -- dropout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["regenerate", "packed"])
@pytest.mark.parametrize("inplace", [False, True])
def test_dropout_gradient_is_the_mask_drawn(mode, inplace):
    torch.manual_seed(3)
    x = torch.rand(40, 50, dtype=torch.float64) + 0.5           # no zeros: y / x is the mask x scale
    x.requires_grad_()
    y = compact_dropout(x.clone() if inplace else x * 1.0, 0.3, mode, inplace)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    factor = (y / x).detach()
    assert set(torch.unique(factor.round(decimals=12)).tolist()) <= {0.0, round(1 / 0.7, 12)}
    assert torch.allclose(gx, g * factor, rtol=0, atol=1e-14)
    assert abs((factor > 0).double().mean().item() - 0.7) < 0.03


def test_dropout_is_reproducible_from_the_global_seed_and_saves_a_seed():
    x = torch.randn(64, 128, requires_grad=True)
    torch.manual_seed(5)
    a = compact_dropout(x, 0.5, "regenerate")
    torch.manual_seed(5)
    b = compact_dropout(x, 0.5, "regenerate")
    assert torch.equal(a, b)
    assert saved_storages(lambda: compact_dropout(x, 0.5, "regenerate")) == [((1,), torch.int64, 8)]
    assert saved_storages(lambda: compact_dropout(x, 0.5, "packed")) == [((1024,), torch.uint8, 1024)]


def test_dropout_bad_p():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        compact_dropout(torch.ones(2, requires_grad=True), 1.0)


# -- batch norm ---------------------------------------------------------------------------------------

BN_CASES = list(itertools.product([(16, 5), (8, 5, 7), (4, 5, 6, 3)], [True, False], [True, False]))


@pytest.mark.parametrize("shape,batch_stats,affine", BN_CASES)
def test_batch_norm_matches_autograd_float64(shape, batch_stats, affine):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).requires_grad_()
    w = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_() if affine else None
    rm, rv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y = compact_batch_norm(x, w, b, rm, rv, batch_stats, 0.1, 1e-5)
    expected = F.batch_norm(x, rm_ref, rv_ref, w, b, batch_stats, 0.1, 1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-14, atol=1e-14)
    assert torch.equal(rm, rm_ref) and torch.equal(rv, rv_ref)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    wrt = [x] + ([w, b] if affine else [])
    for got, want in zip(grads(y, wrt, g), grads(expected, wrt, g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_batch_norm_saves_the_normalised_input_once():
    x = torch.randn(32, 16, 8, 8, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    b = torch.zeros(16, requires_grad=True)

    def step():
        y = compact_batch_norm(x, w, b, None, None, True, 0.0, 1e-5)
        return masked_activation(y, "hardtanh")

    big = [s for s in saved_storages(step) if s[2] >= x.numel()]
    assert big == [((32, 16, 8, 8), torch.float32, x.numel() * 4)]


def test_frozen_batch_norm_in_eval_saves_no_activation():
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    w, b = torch.ones(4), torch.zeros(4)      # frozen affine
    saved = saved_storages(lambda: compact_batch_norm(x, w, b, torch.zeros(4), torch.ones(4),
                                                      False, 0.0, 1e-5))
    assert all(s[2] <= 4 * 4 for s in saved)


@pytest.mark.parametrize("storage,bytes_per_element", [("bf16", 2), ("int8", 1)])
def test_reduced_precision_batch_norm_is_measured(storage, bytes_per_element):
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(32, 8, 6, 6, generator=gen) * 2 + 0.5).requires_grad_()
    w = (torch.rand(8, generator=gen) + 0.5).requires_grad_()
    b = torch.zeros(8, requires_grad=True)
    g = torch.randn(32, 8, 6, 6, generator=gen)
    y = compact_batch_norm(x, w, b, None, None, True, 0.0, 1e-5, storage)
    expected = F.batch_norm(x.double(), None, None, w.double(), b.double(), True, 0.0, 1e-5)
    got = grads(y, [x, w], g)
    want = grads(expected, [x, w], g.double())
    cosines = [F.cosine_similarity(a.double().flatten(), c.flatten(), 0).item() for a, c in zip(got, want)]
    assert min(cosines) > 0.999                       # measured: ~0.99999 (bf16), ~0.9999 (int8)
    assert min(cosines) < 1 - 1e-9                    # and not exact: it is an approximation
    big = [s for s in saved_storages(lambda: compact_batch_norm(x, w, b, None, None, True, 0.0,
                                                                1e-5, storage)) if s[2] > 64]
    assert [s[2] for s in big] == [x.numel() * bytes_per_element]


# -- recomputed segments ------------------------------------------------------------------------------

def test_recomputed_segment_is_exact_and_keeps_only_its_input():
    torch.manual_seed(7)
    seg = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
                        nn.MaxPool2d(2)).double()
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    ref_seg = copy.deepcopy(seg)
    state = torch.get_rng_state()
    expected = ref_seg(x)
    expected.square().sum().backward()
    torch.set_rng_state(state)
    y = recompute_segment(seg, x, seg)
    assert torch.equal(y, expected)
    y.square().sum().backward()
    for p, q in zip(seg.parameters(), ref_seg.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
    for a, c in zip(seg.buffers(), ref_seg.buffers()):   # running statistics updated once
        assert torch.equal(a, c)
    params = {p.untyped_storage().data_ptr() for p in seg.parameters()}
    saved = [s for s in saved_storages(lambda: recompute_segment(seg, x, seg))
             if s[2] > 8 * 8 * 8]
    assert saved == [((4, 3, 10, 10), torch.float64, x.numel() * 8)] and params


# -- the model-level API -----------------------------------------------------------------------------

def _global_rel_error(model_a, model_b) -> float:
    num = sum(float((p.grad - q.grad).square().sum()) for p, q in zip(model_a.parameters(), model_b.parameters()))
    den = sum(float(q.grad.square().sum()) for q in model_b.parameters())
    return (num / den) ** 0.5


@pytest.mark.parametrize("factory", ["resnet18", "mobilenet_v2"])
def test_compact_activations_on_torchvision_models(factory):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(8)
    plain = getattr(torchvision.models, factory)(num_classes=5).double()
    if factory == "mobilenet_v2":
        plain.classifier[0].p = 0.0          # its dropout mask comes from another random stream
    model = copy.deepcopy(plain)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = lance_cl.compact_activations(model)
    kinds = {r.kind for r in report}
    assert {"activation", "batch_norm"} <= kinds
    assert model.state_dict().keys() == state.keys()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    r = torch.randn(2, 5, dtype=torch.float64)
    for m in (model, plain):
        (m(x) * r).sum().backward()
    assert _global_rel_error(model, plain) < 1e-10
    for k, v in model.state_dict().items():                 # running statistics moved identically
        assert torch.equal(v, plain.state_dict()[k])
    lance_cl.uncompact_activations(model)
    assert all(type(a) is type(b) for a, b in zip(model.modules(), plain.modules()))


def test_compact_activations_on_an_avalanche_model_saves_less():
    from avalanche.models import SimpleCNN

    torch.manual_seed(9)
    plain = SimpleCNN(num_classes=4)
    model = copy.deepcopy(plain)
    lance_cl.compact_activations(model, dropout="packed")
    x = torch.randn(8, 3, 16, 16)

    def step(m):
        return lambda: m(x).sum()
    before = sum(s[2] for s in saved_storages(step(plain)))
    after = sum(s[2] for s in saved_storages(step(model)))
    # what remains is the convs' inputs (ReLU outputs the next conv saves anyway) and the fc input
    assert after < before
    plain.eval()
    model.eval()
    assert torch.equal(model(x), plain(x))
    # training mode, float64, dropout off in both (its mask comes from another random stream):
    # every gradient is plain autograd's
    for m in (plain, model):
        m.double().train()
        for d in m.modules():
            if isinstance(d, nn.Dropout):
                d.p = 0.0
    x64 = x.double()
    r = torch.randn(8, 4, dtype=torch.float64)
    for m in (model, plain):
        (m(x64) * r).sum().backward()
    assert _global_rel_error(model, plain) < 1e-12


def test_compact_activations_bad_options():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(ValueError, match="batch_norm='fp8'"):
        lance_cl.compact_activations(model, batch_norm="fp8")
    with pytest.raises(ValueError, match="dropout="):
        lance_cl.compact_activations(model, dropout="none")
    with pytest.raises(ValueError, match="neither a submodule"):
        lance_cl.compact_activations(model, recompute=["stem"])


def test_compress_can_compact_the_rest_of_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    lance_cl.compress(model, "vanilla", compact={"batch_norm": "bf16"})
    rows = {r.name: r for r in lance_cl.compact_report(model)}
    assert set(rows) == {"1", "2", "3"} and rows["1"].saves == "normalised input (bf16)"
    lance_cl.uncompress(model)
    lance_cl.uncompact_activations(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
                                        nn.Flatten, nn.Linear]


def test_alexnet_stem_recompute_is_exact():
    from lance_cl.models import AlexNet5

    torch.manual_seed(10)
    plain = AlexNet5(n_tasks=1, n_classes=3, dropout=False).double()
    model = copy.deepcopy(plain)
    assert model.segment_names() == ("stem",)
    report = lance_cl.compact_activations(model, recompute=["stem"])
    assert any(r.kind == "segment" and r.name == "stem" for r in report)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    t = torch.zeros(4, dtype=torch.long)
    for m in (model, plain):
        m(x, t).square().sum().backward()
    assert _global_rel_error(model, plain) < 1e-10
    lance_cl.uncompact_activations(model)
    assert model.recomputed_segments == set()


def test_recomputed_layer_names_are_the_recomputed_chains_and_submodules():
    from lance_cl.compact import recomputed_layer_names
    from lance_cl.models import AlexNet5

    model = AlexNet5(n_tasks=1)
    assert recomputed_layer_names(model) == set()
    lance_cl.compact_activations(model, recompute=["stem"])
    assert recomputed_layer_names(model) == {"conv1", "bn1", "relu", "drop1", "pool"}
    seq = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                        nn.Conv2d(4, 2, 1))
    lance_cl.compact_activations(seq, recompute=["0"])
    assert recomputed_layer_names(seq) == {"0", "0.0", "0.1", "0.2"}
    lance_cl.compact_activations(seq, recompute=["1"])          # a layer recomputed on its own
    assert recomputed_layer_names(seq) == {"0", "0.0", "0.1", "0.2", "1"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("on, off", [(1.0, 0.0), (1.0, 0.01), (1.0 / 0.7, 0.0)])
def test_unpack_factor_is_the_mask_as_on_and_off_values(dtype, on, off):
    shape = (4, 5, 7)                                            # 140 bits: a partial last byte
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(3)) > 0.4
    factor = unpack_factor(pack_bits(mask), shape, dtype, on, off)
    expected = torch.where(mask, torch.tensor(on, dtype=dtype), torch.tensor(off, dtype=dtype))
    assert factor.dtype == dtype and factor.shape == shape and torch.equal(factor, expected)
    x = torch.randn(shape).to(dtype)
    # the in-place product the backward uses is the plain product with the values
    assert torch.equal(factor.clone().mul_(x), x * expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("on, off", [(1.0, 0.0), (1.0, 0.01), (1.0 / 0.9, 0.0)])
@pytest.mark.parametrize("inplace", [False, True])
def test_multiply_by_mask_rounds_as_pytorchs_product_by_a_scalar(dtype, on, off, inplace):
    """t * on where the mask is set, t * off elsewhere, each rounded once in t's dtype, the way
    PyTorch rounds ``t * scalar`` (in float32 for half and bfloat16)."""
    gen = torch.Generator().manual_seed(5)
    t = torch.randn(3, 4, 11, generator=gen).to(dtype)
    mask = torch.rand(3, 4, 11, generator=gen) > 0.5
    expected = torch.where(mask, t * on, t * off)
    source = t.clone()
    out = multiply_by_mask(source, pack_bits(mask), mask.shape, on, off, inplace=inplace)
    assert out.dtype == dtype and torch.equal(out, expected)
    assert (out.data_ptr() == source.data_ptr()) is inplace
    per_channel = mask[:, :, :1]                                 # broadcast against t
    out = multiply_by_mask(t, pack_bits(per_channel), per_channel.shape, on, off)
    assert out.dtype == dtype and torch.equal(out, torch.where(per_channel, t * on, t * off))


@pytest.mark.parametrize("inplace", [False, True])
def test_apply_keep_mask_is_the_masked_product_scaled_by_the_keep_probability(inplace):
    from lance_cl.core.compact.dropout import apply_keep_mask

    t = torch.randn(3, 4, 5, dtype=torch.float64)
    mask = torch.rand(3, 4, 5) > 0.3
    expected = t * mask.double() / 0.75
    source = t.clone()
    out = apply_keep_mask(source, pack_bits(mask), mask.shape, 0.25, inplace=inplace)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    assert (out.data_ptr() == source.data_ptr()) is inplace
    per_channel = torch.rand(3, 4, 1) > 0.5                      # broadcast (Dropout2d's shape)
    torch.testing.assert_close(apply_keep_mask(t, pack_bits(per_channel), per_channel.shape, 0.5),
                               t * per_channel.double() * 2)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p_and_is_a_function_of_its_seed(p):
    from lance_cl.core.compact.dropout import _CHUNK, keep_mask

    shape = (3, _CHUNK // 2 + 7)                 # more than one chunk, an odd tail
    mask = keep_mask(shape, p, 11, torch.device("cpu"))
    assert mask.shape == shape and mask.dtype == torch.bool
    n = mask.numel()
    # the kept fraction is Binomial(n, 1 - p) / n: within 5 standard deviations
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(mask.double().mean().item() - (1 - p)) <= 5 * sd + 1e-12
    assert torch.equal(mask, keep_mask(shape, p, 11, torch.device("cpu")))
    if 0 < p:
        other = keep_mask(shape, p, 12, torch.device("cpu"))
        assert not torch.equal(mask, other)
        # the two chunks are not copies of each other
        assert not torch.equal(mask.view(-1)[:1000], mask.view(-1)[_CHUNK:_CHUNK + 1000])
