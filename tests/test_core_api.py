"""compress / calibrate / uncompress / report / measure_activation_memory / layer_flops, and the
methods behind them, on small real models."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lance_cl
from lance_cl import CalibrationError, BudgetTooSmallError
from lance_cl.core.tucker import project, reconstruct
from lance_cl.layers import CompressedConv2d, CompressedLinear
from lance_cl.wrap import compressed_layers

DT = torch.float64


class Net(nn.Module):
    """Registration order differs from execution order on purpose."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 5)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, track_running_stats=False)   # batch statistics, as GPM
        self.fc = nn.Linear(8 * 4 * 4, 32)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.fc(x.flatten(1)))
        return self.head(x)


def make(seed=0, dtype=DT):
    torch.manual_seed(seed)
    return Net().to(dtype)


def data(n=16, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images so low ranks carry most energy
    x = torch.randn(n, 3, 4, 4, generator=g, dtype=dtype)
    x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y


def grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_last_n_follows_execution_order_not_registration():
    model = make()
    x, _ = data()
    assert lance_cl.select_layers(model, 2, example_inputs=x) == ["fc", "head"]
    assert lance_cl.select_layers(model, 4, example_inputs=x) == ["conv1", "conv2", "fc", "head"]
    assert lance_cl.select_layers(model, "conv*") == ["conv2", "conv1"]
    assert lance_cl.select_layers(model, nn.Linear) == ["head", "fc"]


def test_compress_shares_parameters_and_uncompress_restores_plain_modules():
    model = make()
    before = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    ref_out = model(x)
    lance_cl.compress(model, "lance", eps=0.9)
    assert isinstance(model.conv1, CompressedConv2d) and isinstance(model.conv1, nn.Conv2d)
    assert isinstance(model.fc, CompressedLinear)
    for n, p in model.named_parameters():
        assert p is before[n]
    lance_cl.calibrate(model, [(x, y)], progress=False)
    torch.testing.assert_close(model(x), ref_out)        # forward is exact
    F.cross_entropy(model(x), y).backward()
    w_before = model.fc.weight.detach().clone()
    opt.step()                                            # the old optimizer still updates
    assert not torch.equal(w_before, model.fc.weight)
    lance_cl.uncompress(model)
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert not compressed_layers(model)
    for n, p in model.named_parameters():
        assert p is before[n]
    assert set(model.state_dict()) == set(make().state_dict())


@pytest.mark.parametrize("method", ["lance", "hosvd", "asi"])
def test_full_energy_methods_equal_vanilla_gradients(method):
    model, ref = make(), make()
    x, y = data()
    lance_cl.compress(model, method, eps=1.0)
    # enough calibration samples that full energy means the full space of every mode
    lance_cl.calibrate(model, [data(160, seed=1)], progress=False)
    got, want = grads(model, x, y), grads(ref, x, y)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-8, atol=1e-10)


def test_lance_weight_gradient_is_the_gradient_of_the_reconstructed_input():
    model, ref = make(), make()
    x, y = data(32)
    lance_cl.compress(model, "lance", layers=["conv2", "fc"], eps=0.6)
    batches = [data(16, seed=s) for s in range(1, 4)]
    lance_cl.calibrate(model, batches, progress=False)
    assert model.conv2.compressor.ranks()[1] < 8   # something was really truncated
    got = grads(model, x, y)
    # independent truth: plain model whose conv2 / fc see x_hat in their weight gradient only
    captured = {}
    for name in ("conv2", "fc"):
        layer = getattr(ref, name)
        layer.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, i[0]))
    out = ref(x)
    gy = {}
    for name in ("conv2", "fc"):
        getattr(ref, name).register_full_backward_hook(
            lambda m, gi, go, name=name: gy.__setitem__(name, go[0]))
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    for name in ("conv2", "fc"):
        layer = getattr(model, name)
        factors = layer.compressor.factors()
        view = layer.activation_view(layer.prepare_input(captured[name].detach()))
        x_hat = reconstruct(project(view, factors), factors)
        w = getattr(ref, name).weight.detach().clone().requires_grad_()
        plain = getattr(ref, name)
        if name == "conv2":
            out_hat = F.conv2d(x_hat, w, None, plain.stride, plain.padding, plain.dilation, plain.groups)
        else:
            out_hat = F.linear(x_hat, w)
        out_hat.backward(gy[name])
        torch.testing.assert_close(got[f"{name}.weight"], w.grad, rtol=1e-9, atol=1e-11)
    # layers left uncompressed are exact
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    torch.testing.assert_close(got["conv1.weight"], ref_grads["conv1.weight"])


def test_calibration_uses_batch_statistics_without_touching_running_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    model[1].running_mean.fill_(5.0)               # immature/odd running statistics
    stats = {k: v.clone() for k, v in model[1].named_buffers()}
    x = torch.randn(32, 3, 8, 8)
    model.train()
    model[2].eval()                                 # a per-module mode that must survive
    lance_cl.compress(model, "lance", layers=["4"], eps=1.0)
    lance_cl.calibrate(model, [x], progress=False)
    for k, v in model[1].named_buffers():
        assert torch.equal(v, stats[k])
    assert model.training and model[1].training and not model[2].training
    # the calibrated subspace is that of the training-time (batch-statistics, no dropout) input
    feats = model[3](model[1](model[0](x))).detach()
    u = model[4].compressor.factor(1)
    torch.testing.assert_close(feats @ u @ u.t(), feats, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="batch_norm="):
        lance_cl.calibrate(model, [x], progress=False, batch_norm="frozen")


def test_changing_batch_sizes_work_and_published_batch_factor_falls_back():
    model = make()
    lance_cl.compress(model, "lance", eps=0.9, compress_batch=True)
    lance_cl.calibrate(model, [data(16, seed=s) for s in range(3)] + [data(5, seed=9)],
                       progress=False)
    assert model.fc.compressor.factor(0).shape[0] == 16
    ref = make()
    for n in (16, 7, 1):
        x, y = data(n, seed=20 + n)
        got = grads(model, x, y)
        if n != 16:
            # with the batch factor dropped, full-energy modes... compare against x_hat truth is
            # covered elsewhere; here: finite, right shapes, and fallback counted
            assert all(torch.isfinite(g).all() for g in got.values())
    assert model.fc.compressor.batch_fallbacks == 2
    assert model.conv1.compressor.batch_fallbacks == 2
    lance_cl.uncompress(model)
    lance_cl.compress(model, "asi", eps=0.9)
    lance_cl.calibrate(model, [data(16)], progress=False)
    for n in (16, 3, 16):
        x, y = data(n, seed=n)
        grads(model, x, y)
        assert model.fc.compressor.factor(0).shape[0] == n   # ASI batch factor follows the batch


def test_asi_step_is_one_subspace_iteration_from_the_previous_factor():
    model = make()
    x, y = data(16)
    lance_cl.compress(model, "asi", layers=["fc"], rank=3)
    lance_cl.calibrate(model, [(x, y)], progress=False)
    prev = [u.clone() if u is not None else None for u in model.fc.compressor.factors()]
    x2, y2 = data(16, seed=5)
    captured = {}
    model.fc.register_forward_hook(lambda m, i, o: captured.__setitem__("x", i[0].detach()))
    grads(model, x2, y2)
    for m in (0, 1):
        a = captured["x"].movedim(m, 0).reshape(captured["x"].shape[m], -1)
        q = torch.linalg.qr(a @ a.t() @ prev[m])[0]
        u = model.fc.compressor.factor(m)
        assert u.shape == (captured["x"].shape[m], 3)
        torch.testing.assert_close(u @ u.t(), q @ q.t(), rtol=1e-8, atol=1e-10)


def test_asi_batch_restart_does_not_touch_global_rng():
    model = make()
    lance_cl.compress(model, "asi", eps=0.8)
    lance_cl.calibrate(model, [data(16)], progress=False)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    with torch.no_grad(), torch.enable_grad():
        model(data(5, seed=3)[0]).sum()
    assert torch.equal(state, torch.get_rng_state())


def test_hosvd_ranks_follow_the_energy_rule_each_step():
    model = make()
    lance_cl.compress(model, "hosvd", layers=["fc"], eps=0.8)
    x, y = data(16)
    captured = {}
    model.fc.register_forward_hook(lambda m, i, o: captured.__setitem__("x", i[0].detach()))
    grads(model, x, y)
    for m, r in enumerate(model.fc.compressor.ranks()):
        s = torch.linalg.svdvals(captured["x"].movedim(m, 0).reshape(captured["x"].shape[m], -1))
        energy = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        assert r == int((energy < 0.8).sum()) + 1


def test_state_dict_round_trips_factors_into_a_fresh_model():
    model = make()
    x, y = data()
    lance_cl.compress(model, "lance", eps=0.7)
    lance_cl.calibrate(model, [(x, y)], progress=False)
    fresh = make(seed=1)
    lance_cl.compress(fresh, "lance", eps=0.7)
    fresh.load_state_dict(model.state_dict())
    for name, layer in compressed_layers(model).items():
        other = compressed_layers(fresh)[name]
        for u, v in zip(layer.compressor.factors(), other.compressor.factors()):
            assert (u is None and v is None) or torch.equal(u, v)
    torch.testing.assert_close(grads(fresh, x, y), grads(model, x, y))


def test_budget_selection_respects_the_budget_and_prefers_lower_error():
    x, y = data(32)
    sizes = {}
    for budget in (6_000, 40_000):
        model = make()
        lance_cl.compress(model, "lance", layers=["conv2", "fc"], budget=budget)
        rep = lance_cl.calibrate(model, [(x, y)], progress=False)
        grads(model, x, y)
        rep = lance_cl.report(model)
        sizes[budget] = sum(r.bytes_after for r in rep)
        assert sizes[budget] <= budget
    assert sizes[40_000] > sizes[6_000]
    model = make()
    lance_cl.compress(model, "asi", layers=["conv2", "fc"], budget=10)
    with pytest.raises(BudgetTooSmallError):
        lance_cl.calibrate(model, [(x, y)], progress=False)


def test_measured_memory_matches_analytic_and_vanilla_saves_inputs():
    model = make(dtype=torch.float32)
    x, y = data(16, dtype=torch.float32)
    names = ["conv1", "conv2", "fc", "head"]
    vanilla = lance_cl.measure_activation_memory(model, x, lambda o: F.cross_entropy(o, y),
                                                 layers=names)
    # conv1 saves x, conv2 saves relu(bn(conv1)), fc saves the flattened relu output, head its input
    expected = 4 * (16 * 3 * 8 * 8 + 16 * 8 * 8 * 8 + 16 * 128 + 16 * 32)
    assert vanilla["selected"] == expected
    lance_cl.compress(model, "lance", eps=0.7)
    lance_cl.calibrate(model, [data(16, seed=s, dtype=torch.float32) for s in range(3)],
                       progress=False)
    measured = lance_cl.measure_activation_memory(model, x, lambda o: F.cross_entropy(o, y))
    analytic = sum(r.bytes_after for r in lance_cl.report(model))
    assert measured["selected"] == analytic
    assert measured["selected"] < vanilla["selected"] / 3
    assert measured["total"] < vanilla["total"]


def test_report_bytes_match_measurement_for_per_step_methods():
    for method in ("hosvd", "asi"):
        model = make(dtype=torch.float32)
        x, y = data(16, dtype=torch.float32)
        lance_cl.compress(model, method, layers=["fc", "head"], eps=0.8)
        lance_cl.calibrate(model, [(x, y)], progress=False)
        measured = lance_cl.measure_activation_memory(model, x, lambda o: F.cross_entropy(o, y))
        rows = lance_cl.report(model)
        assert measured["selected"] == sum(r.bytes_after for r in rows)
        assert all(r.bytes_after < r.bytes_before for r in rows)


def test_measurement_counts_whole_storages_of_saved_views():
    class SaveView(torch.autograd.Function):
        @staticmethod
        def forward(x, big):
            return x * 1.0

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[1][:, :1])   # a narrow view of a large tensor

        @staticmethod
        def backward(ctx, g):
            return g, None

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = torch.zeros(100, 50)
            self.p = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return SaveView.apply(x * self.p, self.big)

    stats = lance_cl.measure_activation_memory(M(), torch.ones(3), lambda o: o.sum(), layers=[])
    assert stats["total"] >= 100 * 50 * 4


def test_layer_flops_hand_computed():
    lin = nn.Linear(10, 4)
    f = lance_cl.layer_flops(lin, (8, 10))
    assert f["forward"] == f["backward_input"] == f["backward_weight"] == 2 * 8 * 10 * 4
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    f = lance_cl.layer_flops(conv, (2, 4, 9, 9))
    assert f["forward"] == 2 * (2 * 6 * 5 * 5 * 2 * 9)
    model = make()
    x, y = data(8)
    lance_cl.compress(model, "lance", layers=["fc"], rank=3)
    lance_cl.calibrate(model, [(x, y)], progress=False)
    grads(model, x, y)
    f = lance_cl.layer_flops(model.fc)
    # core (8, 3): projection 8*128*3; grad: (32 x 8)(8 x 3) then lift 32*3*128
    assert f["compression"] == 2 * 8 * 128 * 3
    assert f["backward_weight"] == 2 * (8 * 32 * 3 + 32 * 3 * 128)


# ---------------------------------------------------------------------------------------------
# bad input

def test_training_before_calibration_names_layer_and_fix():
    model = make()
    lance_cl.compress(model, "lance")
    x, y = data()
    with pytest.raises(CalibrationError, match=r"'conv1'.*lance_cl\.calibrate"):
        F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        model(x)     # inference needs no calibration


def test_shape_change_after_calibration_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    lance_cl.compress(model, "lance")
    lance_cl.calibrate(model, [torch.randn(4, 3, 8, 8)], progress=False)
    with pytest.raises(CalibrationError, match=r"layer '0'.*calibrated for activations"):
        model(torch.randn(4, 3, 10, 10)).sum().backward()


def test_unsupported_layers_and_methods_are_clear_errors():
    model = make()
    with pytest.raises(TypeError, match="BatchNorm2d layers cannot be compressed; supported"):
        lance_cl.compress(model, "lance", layers="bn")
    with pytest.raises(TypeError, match="cannot be compressed"):
        lance_cl.compress(model, "lance", layers=nn.BatchNorm2d)
    with pytest.raises(ValueError, match="unknown compression method 'svd'"):
        lance_cl.compress(model, "svd")
    with pytest.raises(ValueError, match="matches no module"):
        lance_cl.compress(model, "lance", layers="encoder.*")
    with pytest.raises(ValueError, match="Conv2d only"):
        lance_cl.compress(model, "gradient_filter", layers="fc")
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        lance_cl.compress(model, "lance", eps=1.5)
    with pytest.raises(ValueError, match="needs example_inputs"):
        lance_cl.compress(model, "lance", layers=2)
    with pytest.raises(TypeError, match="unexpected options"):
        lance_cl.compress(model, "hosvd", radius=3)


def test_autocast_bfloat16_on_cpu_keeps_exact_output_and_float32_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 5))
    ref = copy.deepcopy(model)
    x = torch.randn(8, 3, 8, 8)
    lance_cl.compress(model, "lance", eps=1.0)
    lance_cl.calibrate(model, [x], progress=False)
    assert model[0].compressor.factor(1).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref_out = model(x), ref(x)
    torch.testing.assert_close(out, ref_out)
    out.float().sum().backward()
    ref_out.float().sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32
        cos = F.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos > 0.99


@pytest.mark.parametrize("method", ["lance", "gradient_filter"])
def test_double_backward_through_a_compressed_layer_raises(method):
    """grad_weight depends on the input through the core; a silent second derivative that treats
    it as a constant would be wrong, so double backward must refuse."""
    layer = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    lance_cl.compress(layer, method)
    if method == "lance":
        lance_cl.calibrate(layer, [x.detach()], progress=False)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.sum().backward()
