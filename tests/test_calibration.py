"""lance_cl.Calibration (begin / observe / Grams / fix from an energy, a budget or given factors)
and the layer modes, against hand-computed Grams, eigenvectors and saved bytes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lance_cl
from lance_cl import Calibration, CalibrationError, LayerMode

DT = torch.float64


def _batches(n: int, seed: int = 0, scale=(10.0, 3.0, 1.0, 0.1)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, generator=g, dtype=DT) * torch.tensor(scale, dtype=DT)
            for _ in range(n)]


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3)).double()


def test_grams_are_the_summed_mode_grams():
    model = _linear_model()
    lance_cl.compress(model, "lance", eps=0.9)
    batches = _batches(3)
    calib = Calibration(model)
    assert list(calib.layers) == ["0"]
    calib.begin()
    assert model[0].mode is LayerMode.CALIBRATING
    for x in batches:
        calib.observe(x)
    calib.end()
    assert model[0].mode is LayerMode.COMPRESSED and calib.num_batches == 3
    expected = sum(x.t() @ x for x in batches)                 # X_(1) X_(1)^T of (B, 4) views
    grams = calib.grams("0")
    assert list(grams) == [1]                                   # the batch mode is not compressed
    torch.testing.assert_close(grams[1], expected)
    assert calib.shape("0") == (4,)


def test_conv_channel_gram_sums_over_batch_and_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3)).double()
    lance_cl.compress(model, "lance")
    x = torch.randn(2, 2, 5, 5, dtype=DT)
    calib = Calibration(model).run([x], progress=False)
    flat = x.permute(1, 0, 2, 3).reshape(2, -1)                 # channels x (batch, H, W)
    torch.testing.assert_close(calib.grams("0")[1], flat @ flat.t())


def test_a_column_ratio_samples_conv_patches_and_keeps_every_linear_row():
    """ratio 1: a conv's fan-in Gram (9 patch rows per image, 18 fan-in) gets 18 of 72
    columns per batch, an unbiased estimate; a Linear with fewer rows than its fan-in keeps
    all of them, so its Gram is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(27, 2)).double()
    lance_cl.compress(model, "lance", layout="patch")
    batches = [torch.randn(8, 2, 5, 5, dtype=DT) for _ in range(3)]
    exact = Calibration(model).run(batches, progress=False)
    sampled = Calibration(model, column_ratio=1.0).run(batches, progress=False)
    torch.testing.assert_close(sampled.grams("2")[1], exact.grams("2")[1])
    conv_exact, conv_sampled = exact.grams("0")[1], sampled.grams("0")[1]
    assert conv_sampled.shape == conv_exact.shape == (18, 18)
    assert not torch.allclose(conv_sampled, conv_exact)
    assert sampled.columns("0") == {1: 3 * 18, 2: 3 * 9} and exact.columns("2") == {1: 24}
    # unbiased: the trace (total energy) is close, not equal (it is a sum of 54 of 216 columns)
    assert abs(float(conv_sampled.trace() / conv_exact.trace()) - 1) < 0.5
    with pytest.raises(ValueError, match="column_ratio"):
        Calibration(model, column_ratio=0)


def test_restricted_modes_gather_only_those_grams():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3)).double()
    lance_cl.compress(model, "lance", layout="patch")
    x = torch.randn(4, 2, 6, 6, dtype=DT)
    full = Calibration(model).run([x], progress=False)
    only = Calibration(model, modes={"0": (1,)}).run([x], progress=False)
    assert sorted(full.grams("0")) == [1, 2] and sorted(only.grams("0")) == [1]
    torch.testing.assert_close(only.grams("0")[1], full.grams("0")[1])
    only.fix_energy(eps=0.9)
    factors = model[0].compressor.factors()
    assert factors[1] is not None and factors[2] is None       # no Gram, no position factor
    with pytest.raises(KeyError, match="not calibrated here"):
        Calibration(model, modes={"nope": (1,)}).begin()


def test_fix_energy_takes_the_top_eigenvectors_the_energy_rule_asks_for():
    model = _linear_model()
    lance_cl.compress(model, "lance", eps=0.9)
    batches = _batches(2)
    calib = Calibration(model).run(batches, progress=False)
    calib.fix_energy()
    gram = sum(x.t() @ x for x in batches)
    lam, vec = torch.linalg.eigh(gram)
    lam, vec = lam.flip(0), vec.flip(1)
    rank = int((torch.cumsum(lam, 0) / lam.sum() < 0.9).sum()) + 1      # smallest k with >= 90 %
    u = model[0].compressor.factor(1)
    assert u.shape == (4, rank) and 1 <= rank < 4
    # same subspace (eigenvectors are defined up to sign)
    torch.testing.assert_close((u.t() @ vec[:, :rank]).abs(), torch.eye(rank, dtype=DT), atol=1e-8, rtol=0)
    assert model[0].compressor.calibrated_shape.tolist() == [4]


def test_fix_factors_given_by_the_caller_and_training_uses_them():
    model = _linear_model()
    lance_cl.compress(model, "lance")
    calib = Calibration(model).run(_batches(1), progress=False)
    u = torch.eye(4, dtype=DT)[:, :2]                           # keep the first two inputs
    calib.fix_factors("0", [None, u])
    torch.testing.assert_close(model[0].compressor.factor(1), u)
    x = _batches(1, seed=5)[0]
    model(x).square().sum().backward()
    # exact output, so gy = 2 y; grad_weight = gy^T (x U U^T): the last two columns get nothing
    gy = 2 * (x @ model[0].weight.detach().t() + model[0].bias.detach())
    torch.testing.assert_close(model[0].weight.grad, gy.t() @ (x @ u @ u.t()))
    assert model[0].weight.grad[:, 2:].abs().max() == 0
    with pytest.raises(ValueError, match="2 factors given for 2 modes|1 factors given for 2 modes"):
        calib.fix_factors("0", [u])


def test_calibration_protocol_errors_are_clear():
    model = _linear_model()
    lance_cl.compress(model, "lance")
    calib = Calibration(model)
    with pytest.raises(CalibrationError, match="begin"):
        calib.observe(_batches(1)[0])
    with pytest.raises(CalibrationError, match="nothing observed"):
        calib.grams("0")
    calib.begin()
    with pytest.raises(CalibrationError, match="twice"):
        calib.begin()
    calib.observe(_batches(1)[0])
    with pytest.raises(CalibrationError, match="after end"):
        calib.fix_energy()
    calib.end()
    with pytest.raises(KeyError, match="not calibrated here"):
        calib.grams("nope")
    with pytest.raises(ValueError, match="got no batch"):
        Calibration(model).run([], progress=False)
    with pytest.raises(ValueError, match="begin_calibration"):
        model[0].set_mode(LayerMode.CALIBRATING)


def _bn_dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Dropout(0.5), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def test_budget_path_leaves_batchnorm_statistics_modes_and_rng_untouched():
    model = _bn_dropout_model()
    model.train()
    model[1].running_mean.fill_(0.25)
    model[1].running_var.fill_(2.0)
    lance_cl.compress(model, "lance", budget=20_000)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g))
               for _ in range(2)]
    stats = {k: v.clone() for k, v in model[1].named_buffers()}
    rng = torch.get_rng_state()
    lance_cl.calibrate(model, batches, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model[1].named_buffers():
        assert torch.equal(v, stats[k]), k
    assert all(m.training for m in model.modules())
    assert all(f is not None for f in (model[0].compressor.factor(1), model[5].compressor.factor(1)))
    report = lance_cl.report(model)
    assert sum(r.bytes_after for r in report) <= 20_000


def test_budget_choice_does_not_depend_on_dropout_draws():
    """The exact gradients of the budget search come from a dropout-free step: two calibrations
    under different global seeds pick the same ranks."""
    ranks = []
    for seed in (0, 123):
        model = _bn_dropout_model()
        lance_cl.compress(model, "lance", budget=20_000)
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g))]
        torch.manual_seed(seed)
        lance_cl.calibrate(model, batches, progress=False)
        ranks.append([r.ranks for r in lance_cl.report(model)])
    assert ranks[0] == ranks[1]


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    return lance_cl.measure_activation_memory(model, x, lambda out: out.sum(), peak=False)["selected"]


def test_layer_modes_decide_what_backward_keeps():
    model = _linear_model()
    lance_cl.compress(model, "lance", rank=1)
    Calibration(model).run(_batches(1), progress=False).fix_energy()
    x = _batches(1, seed=3)[0]
    core_and_factor = 8 * (8 * 1 + 4 * 1)                        # core (8, 1) + U (4, 1), float64
    assert _saved_bytes(model, x) == core_and_factor
    for mode in (LayerMode.FULL_BACKPROP, LayerMode.STORE_INPUT):
        model[0].set_mode(mode)
        assert _saved_bytes(model, x) == 8 * 8 * 4               # the input itself
        xx = x.clone().requires_grad_(True)
        model.zero_grad()
        model(xx).square().sum().backward()
        ref = _linear_model()
        ref(x).square().sum().backward()
        torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad)   # plain autograd
    model[0].set_mode(LayerMode.FROZEN)
    assert _saved_bytes(model, x.clone().requires_grad_(True)) == 0      # only the weight
    model[0].set_mode(LayerMode.COMPRESSED)
    assert _saved_bytes(model, x) == core_and_factor
    with pytest.raises(TypeError, match="LayerMode"):
        model[0].set_mode("compressed")


@pytest.mark.parametrize("method", ["lance", "asi"])
def test_double_backward_through_a_compressed_linear_raises(method):
    model = _linear_model()
    lance_cl.compress(model, method)
    lance_cl.calibrate(model, _batches(1), progress=False)
    x = _batches(1, seed=2)[0].requires_grad_(True)
    (gx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.sum().backward()


def test_asi_calibrates_on_its_first_batch_only():
    model = _linear_model()
    lance_cl.compress(model, "asi", eps=0.9)
    batches = _batches(3)
    calib = Calibration(model).run(batches, progress=False)
    first = batches[0]
    torch.testing.assert_close(calib.grams("0")[0], first @ first.t())      # batch mode too
    torch.testing.assert_close(calib.grams("0")[1], first.t() @ first)
    assert calib.num_batches == 3


def test_calibration_on_running_statistics_uses_eval_batchnorm():
    model = _bn_dropout_model()
    model[1].running_mean.fill_(5.0)
    lance_cl.compress(model, "lance", layers=["5"])
    x = torch.randn(4, 3, 6, 6)
    calib = Calibration(model, batch_norm="running").run([x], progress=False)
    with torch.no_grad():
        model.eval()
        h = F.relu(model[1](model[0](x))).flatten(1).double()
    torch.testing.assert_close(calib.grams("5")[1].double(), h.t() @ h, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="'batch' or 'running'"):
        Calibration(model, batch_norm="frozen")
