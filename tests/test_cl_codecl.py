"""CODE-CL: conceptor algebra against hand-written float64 formulas, the aperture rule against a
transcription of the official loop, the gradient projection, the protection guarantee for both
plugin orders with best weights restored, the per-task transfer matrices, exact resume and the
optimizer guard.

The guarantee tested: a protected layer's accumulated update over a later task is D (I - C)
(plain SGD, C fixed during the task), so for a layer input x it moves the output by
D (I - C) x. For the samples S that built the conceptor (correlation R = X X^T / n),
tr((I - C) R (I - C)) = sum_i r_i (a^-2 / (r_i + a^-2))^2 <= d a^-2 / 4 (AM-GM; directions cut by
the 0.2 lower bound have r_i < a^-2 / 4 and obey it too). With the inputs of the old tasks in a
low-dimensional span and a = 1e4, every such input has ||(I - C) x|| <= 1e-4 sqrt(n d) / 2, so
the old tasks' outputs must stay put to float32 rounding.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lance_cl.cl.plugins import CODEPlugin
from lance_cl.cl.plugins.codecl import (adapt_aperture, capacity, conceptor, conceptor_and,
                                        conceptor_not, conceptor_or, project_gradient,
                                        recipe_plugins, truncate_spectrum)
from lance_cl.cl.protocol import GPMSchedulePlugin
from lance_cl.cl.subspace import UnsafeOptimizerError
from lance_cl.models.heads import MultiHeadModule
from lance_cl.strategies import quiet_evaluator

D_IN, D_SPAN, N = 20, 6, 48


# -- algebra -----------------------------------------------------------------------------------
def _spd(d: int, seed: int, rank: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


def _conceptor_np(r: np.ndarray, aperture: float) -> np.ndarray:
    return r @ np.linalg.inv(r + aperture ** -2 * np.eye(len(r)))


def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(a)


def _eig(c: Tensor) -> np.ndarray:
    return np.linalg.eigvalsh(c.numpy())


def test_conceptor_is_r_times_inverse_of_r_plus_aperture_term():
    r = _spd(7, 0, rank=4)                                # singular correlation
    for aperture in (0.5, 4.0, 30.0):
        c = conceptor(_t(r), aperture)
        np.testing.assert_allclose(c.numpy(), _conceptor_np(r, aperture), atol=1e-10)
        lam = _eig(c)
        assert lam.min() > -1e-12 and lam.max() < 1 and (lam < 1e-9).sum() == 3
    with pytest.raises(ValueError, match="aperture"):
        conceptor(_t(r), 0.0)


def test_and_or_match_closed_forms_for_invertible_conceptors():
    c = conceptor(_t(_spd(6, 1)), 2.0).numpy()
    b = conceptor(_t(_spd(6, 2)), 3.0).numpy()
    eye, inv = np.eye(6), np.linalg.inv
    both = inv(inv(c) + inv(b) - eye)
    either = inv(eye + inv(c @ inv(eye - c) + b @ inv(eye - b)))
    np.testing.assert_allclose(conceptor_and(_t(c), _t(b)).numpy(), both, atol=1e-9)
    np.testing.assert_allclose(conceptor_or(_t(c), _t(b)).numpy(), either, atol=1e-9)
    # the OR of two conceptors at one aperture is the conceptor of the summed correlations
    r, q = _spd(6, 3, rank=2), _spd(6, 4, rank=3)
    np.testing.assert_allclose(conceptor_or(conceptor(_t(r), 5.0), conceptor(_t(q), 5.0)).numpy(),
                               _conceptor_np(r + q, 5.0), atol=1e-6)


def test_conceptor_identities():
    c = conceptor(_t(_spd(5, 5, rank=3)), 4.0)
    b = conceptor(_t(_spd(5, 6)), 1.5)
    zero, eye = torch.zeros(5, 5, dtype=torch.float64), torch.eye(5, dtype=torch.float64)
    # the AND / adaptation clamp (eigenvalues in [1e-8, 1 - 1e-7]) bounds the exactness
    torch.testing.assert_close(conceptor_or(c, zero), c, rtol=0, atol=1e-6)
    torch.testing.assert_close(conceptor_or(c, eye), eye, rtol=0, atol=1e-6)
    torch.testing.assert_close(conceptor_and(c, eye), c, rtol=0, atol=1e-6)
    torch.testing.assert_close(conceptor_and(c, zero), zero, rtol=0, atol=1e-7)
    torch.testing.assert_close(conceptor_not(conceptor_or(c, b)),
                               conceptor_and(conceptor_not(c), conceptor_not(b)), rtol=0, atol=1e-9)
    torch.testing.assert_close(conceptor_or(c, b), conceptor_or(b, c), rtol=0, atol=1e-9)
    for m in (conceptor_or(c, b), conceptor_and(c, b)):
        lam = _eig(m)
        assert lam.min() >= 0 and lam.max() < 1
    # AND is below both, OR above both (Loewner order; up to the 1e-8 floor of the clamp)
    assert _eig(c - conceptor_and(c, b)).min() > -2e-8 and _eig(conceptor_or(c, b) - b).min() > -2e-8


def test_and_of_singular_conceptors_lives_on_the_intersection_of_ranges():
    c = torch.diag(torch.tensor([0.8, 0.5, 0.0, 0.0], dtype=torch.float64))
    b = torch.diag(torch.tensor([0.0, 0.6, 0.9, 0.0], dtype=torch.float64))
    expected = 1.0 / (1 / 0.5 + 1 / 0.6 - 1)                  # only e2 is in both ranges
    torch.testing.assert_close(conceptor_and(c, b), torch.diag(torch.tensor(
        [1e-8, expected, 1e-8, 1e-8], dtype=torch.float64)), rtol=0, atol=1e-12)
    # De Morgan with singular NOTs: 0.8 v 0 = 0.8, 0.5 v 0.6 = 1 / (1 + 1/(1 + 1.5)); 0 v 0 =
    # not(1 and 1) = 1 - 1, where the clamp of AND at 1 - 1e-7 leaves 1e-7
    either = 1.0 / (1.0 + 1.0 / (0.5 / 0.5 + 0.6 / 0.4))
    torch.testing.assert_close(torch.diagonal(conceptor_or(c, b)), torch.tensor(
        [0.8, either, 0.9, 1e-7], dtype=torch.float64), rtol=0, atol=1e-9)
    assert capacity(c) == pytest.approx(1.3 / 4)


def test_aperture_adaptation_equals_a_larger_aperture_and_truncation_cuts_small_eigenvalues():
    r = _spd(6, 7, rank=5)
    c = conceptor(_t(r), 2.0)
    lam_c = torch.linalg.eigvalsh(c)
    adapted = adapt_aperture(lam_c, 1.1)
    expected = np.linalg.eigvalsh(_conceptor_np(r, 2.2))
    np.testing.assert_allclose(adapted.numpy(), np.clip(expected, 1e-8, 1 - 1e-7), atol=1e-10)
    vectors, values = truncate_spectrum(c, 0.2)
    lam, vec = np.linalg.eigh(c.numpy())
    kept = lam >= 0.2
    assert 0 < kept.sum() < 6 and values.numel() == kept.sum()
    np.testing.assert_allclose(((vectors * values) @ vectors.t()).numpy(),
                               (vec[:, kept] * lam[kept]) @ vec[:, kept].T, atol=1e-10)


def test_project_gradient_is_g_minus_g_c():
    rng = np.random.default_rng(8)
    c = conceptor(_t(_spd(9, 9, rank=4)), 3.0)
    vectors, values = truncate_spectrum(c, 0.0)
    g = rng.standard_normal((5, 9))
    np.testing.assert_allclose(project_gradient(_t(g), vectors, values).numpy(), g - g @ c.numpy(),
                               atol=1e-10)


# -- models and benchmarks -----------------------------------------------------------------------
class TwoLayerBody(MultiHeadModule):
    """fc1 (20 -> 16) -> fc2 (16 -> 12) -> ReLU -> one head per task (no non-linearity between
    fc1 and fc2: fc2's inputs for inputs in a 6-dim span lie in a 7-dim span)."""

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, 16)
        self.fc2 = nn.Linear(16, 12)
        self._make_heads(12, n_tasks, 2)

    def features(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc2(self.fc1(x)))


class ConvBody(MultiHeadModule):
    """conv (2 -> 4, 3x3, stride 2, padding 1) -> ReLU -> fc (36 -> 10) -> ReLU -> heads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(36, 10)
        self._make_heads(10, 2, 2)

    def features(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1)))


def _span() -> Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.linalg.qr(torch.randn(D_IN, D_SPAN, generator=g))[0]


def _data(shared_tasks: int):
    """``shared_tasks`` tasks with inputs in span(A), then one task on all of R^20 (2 classes
    each); their validation sets have flipped labels, so each one's best epoch is the first."""
    g = torch.Generator().manual_seed(0)
    a = _span()
    xs, ys, vals = [], [], []
    for t in range(shared_tasks + 1):
        z = torch.randn(N + 32, D_SPAN if t < shared_tasks else D_IN, generator=g)
        x = z @ a.t() if t < shared_tasks else z
        y = (z[:, t] > 0).long()
        xs.append(x[:N])
        ys.append(2 * t + y[:N])
        vals.append(TensorDataset(x[N:], 1 - y[N:] if t < shared_tasks else y[N:]))
    x, y = torch.cat(xs), torch.cat(ys)
    bm = nc_benchmark(TensorDataset(x, y), TensorDataset(x, y), n_experiences=shared_tasks + 1,
                      task_labels=True, shuffle=False, fixed_class_order=list(range(2 * shared_tasks + 2)),
                      class_ids_from_zero_in_each_exp=True)
    return bm, vals, a, xs


def _plugin(**options) -> CODEPlugin:
    base = dict(aperture=1e4, aperture_gain=0.95, num_free_dim=0, basis_samples=125)
    base.update(options)
    return CODEPlugin(**base)


def _strategy(model, plugin, schedule, order: str, epochs: int = 4, optimizer=None):
    """Naive SGD (lr 0.2, batch 16) with the plugin and the schedule in the given order."""
    pair = [plugin, schedule]
    return Naive(model=model, optimizer=optimizer or torch.optim.SGD(model.parameters(), lr=0.2),
                 criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=epochs,
                 eval_mb_size=64, evaluator=quiet_evaluator(),
                 plugins=pair if order == "codecl_first" else pair[::-1])


def _transfer_run(epochs: int = 2):
    """Three tasks (two in the shared span), transfer on every layer (K = 3): the first two
    tasks trained. Returns (benchmark, validation sets, model, plugin, strategy)."""
    bm, vals, _, _ = _data(shared_tasks=2)
    torch.manual_seed(0)
    model = TwoLayerBody(3)
    plugin = _plugin(num_free_dim=3, min_linear_fan_in=0)
    strategy = _strategy(model, plugin, GPMSchedulePlugin(vals, lr=0.2, patience=50), "codecl_first",
                         epochs)
    strategy.train(bm.train_stream[0])
    return bm, vals, model, plugin, strategy


def _outputs(model: nn.Module, x: Tensor, task) -> Tensor:
    """Eval-mode outputs in float64 (the model's mode is restored)."""
    was_training = model.training
    with torch.no_grad():
        out = model.eval()(x, task).double()
    model.train(was_training)
    return out


class _StateAtEpoch(SupervisedPlugin):
    """model.state_dict() after every epoch, per experience."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshots: dict[int, list[dict[str, Tensor]]] = {}

    def after_training_epoch(self, strategy, *args, **kwargs):
        self.snapshots.setdefault(strategy.experience.current_experience, []).append(
            {k: v.detach().clone() for k, v in strategy.model.state_dict().items()})


def _inputs_in_span(a: Tensor) -> Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(40, D_SPAN, generator=g) @ a.t()


# -- the aperture rule -------------------------------------------------------------------------
def _official_conceptor(x: np.ndarray, aperture: float, gain: float) -> tuple[np.ndarray, int]:
    """The official update loop (compute_conceptor, then aperture_adaptation(C, 1.1) while
    sum ||C x_j|| / sum ||x_j|| < gain), x: (d, n) columns, in float64."""
    d = x.shape[0]
    r = x @ x.T / x.shape[1]
    c = r @ np.linalg.inv(r + aperture ** -2 * np.eye(d))
    steps = 0
    while np.linalg.norm(c @ x, axis=0).sum() / np.linalg.norm(x, axis=0).sum() < gain:
        c = c @ np.linalg.inv(c + 1.1 ** -2 * (np.eye(d) - c))
        u, s, _ = np.linalg.svd(c)
        c = (u * np.clip(s, 1e-8, 1 - 1e-7)) @ u.T
        steps += 1
    return c, steps


def test_task_conceptors_follow_the_official_aperture_rule_on_conv_and_linear_layers():
    torch.manual_seed(0)
    model = ConvBody().double()
    dataset = TensorDataset(torch.randn(90, 2, 6, 6, dtype=torch.float64), torch.zeros(90).long(),
                            torch.zeros(90).long())
    plugin = CODEPlugin(aperture=[0.7, 3.0], aperture_gain=0.9, num_free_dim=0, eval_mb_size=32)
    inputs = {}
    for name in ("conv", "fc"):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: inputs.setdefault(name, []).append(i[0].detach()))
    ours = plugin.task_conceptors(model, dataset, "cpu")
    conv_in = torch.cat(inputs["conv"][:3])                  # first pass: all 90 samples
    cols = nn.functional.unfold(conv_in, 3, padding=1, stride=2)          # (90, 18, 9)
    columns = {"conv": cols.permute(1, 0, 2).reshape(18, -1).numpy(),
               "fc": torch.cat(inputs["fc"][:3]).t().numpy()}
    for name, aperture in (("conv", 0.7), ("fc", 3.0)):
        reference, steps = _official_conceptor(columns[name], aperture, 0.9)
        assert ours[name]["steps"] == steps
        assert ours[name]["aperture"] == pytest.approx(aperture * 1.1 ** steps)
        np.testing.assert_allclose(ours[name]["matrix"].numpy(), reference, atol=1e-9)
    assert ours["conv"]["steps"] > 0                         # the loop ran


# -- after_backward ----------------------------------------------------------------------------
def test_after_backward_projects_conv_and_linear_gradients():
    torch.manual_seed(1)
    model = ConvBody().double()
    plugin = CODEPlugin(num_free_dim=0)
    refs = {}
    for name, d in (("conv", 18), ("fc", 36)):
        c = conceptor(_t(_spd(d, d, rank=d // 3)), 2.0)
        vectors, values = truncate_spectrum(c, 0.2)
        plugin._projections[name] = (vectors, values)
        refs[name] = (vectors * values) @ vectors.t()
    model(torch.randn(3, 2, 6, 6, dtype=torch.float64), 0).sum().backward()
    raw = {n: model.get_submodule(n).weight.grad.clone() for n in refs}

    class _Strategy:
        pass
    strategy = _Strategy()
    strategy.model = model
    plugin.after_backward(strategy)
    for name, c in refs.items():
        g = raw[name].reshape(raw[name].shape[0], -1).numpy()
        np.testing.assert_allclose(model.get_submodule(name).weight.grad.reshape(g.shape).numpy(),
                                   g - g @ c.numpy(), atol=1e-12)


# -- the transfer forward ----------------------------------------------------------------------
def test_stored_transfer_gives_the_official_effective_weight_and_its_gradient():
    """Task 1 computes with W + W U M U^T - sg(W) U U^T on conv and Linear layers: outputs and
    weight gradients equal plain autograd through that weight (float64); task 0 is plain."""
    torch.manual_seed(2)
    model = ConvBody().double()
    plugin = CODEPlugin(num_free_dim=2)
    g = torch.Generator().manual_seed(3)
    for name, d in (("conv", 18), ("fc", 36)):
        u = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))[0]
        plugin.transfer.setdefault(1, {})[name] = {"basis": u, "scale": torch.randn(2, 2, generator=g,
                                                                                 dtype=torch.float64)}
    plugin.attach(model)
    x = torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64)
    out = model(x, 1)
    out.pow(2).sum().backward()

    weights = {n: model.get_submodule(n).weight.detach().clone().requires_grad_() for n in ("conv", "fc")}

    def effective(name):
        w = weights[name].view(weights[name].shape[0], -1)
        u, m = plugin.transfer[1][name]["basis"], plugin.transfer[1][name]["scale"]
        w_eff = w + w @ u @ m @ u.t() - w.detach() @ u @ u.t()
        return w_eff.view_as(weights[name])
    h = torch.relu(nn.functional.conv2d(x, effective("conv"), None, 2, 1))
    h = torch.relu(nn.functional.linear(h.flatten(1), effective("fc"), model.fc.bias.detach()))
    reference = model.heads[1](h)
    reference.pow(2).sum().backward()
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    for name in ("conv", "fc"):
        torch.testing.assert_close(model.get_submodule(name).weight.grad, weights[name].grad,
                                   rtol=1e-10, atol=1e-12)
    plugin.detach()
    plain = model(x, 0)
    plugin.attach(model)
    torch.testing.assert_close(model(x, 0), plain, rtol=0, atol=0)
    assert (model(x, 1) - model.heads[1](model.features(x))).abs().max() > 1e-3


# -- the guarantee -----------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["codecl_first", "schedule_first"])
def test_old_outputs_survive_a_new_task_when_best_weights_are_restored(order):
    bm, vals, a, xs = _data(shared_tasks=1)
    torch.manual_seed(0)
    model = TwoLayerBody(2)
    plugin, schedule, probe = _plugin(), GPMSchedulePlugin(vals, lr=0.2, patience=50), _StateAtEpoch()
    strategy = _strategy(model, plugin, schedule, order)
    strategy.plugins.append(probe)
    strategy.train(bm.train_stream[0])
    assert schedule.best_epoch[0] == 1
    first, last = probe.snapshots[0][0], probe.snapshots[0][-1]
    assert (last["fc1.weight"] - model.fc1.weight).abs().max() > 1e-2
    torch.testing.assert_close(model.fc1.weight.detach(), first["fc1.weight"])
    # fc2's conceptor was built from the restored network: the bound of the module doc holds
    with torch.no_grad():
        h = model.fc1(xs[0]).double()                                  # all of task 0: (48, 16)
    residual = h - h @ plugin.conceptor_matrix("fc2")
    assert (residual.pow(2).sum() / h.shape[0]).item() <= 16 * 1e-8 / 4
    span_inputs = _inputs_in_span(a)
    before = _outputs(model, span_inputs, 0)
    strategy.train(bm.train_stream[1])
    assert (model.fc1.weight.detach() - first["fc1.weight"]).abs().max() > 1e-3   # it learned
    torch.testing.assert_close(_outputs(model, span_inputs, 0), before, rtol=0, atol=2e-5)
    assert plugin.tasks_trained == 2 and [e["task"] for e in plugin.layer_log] == [0, 1]


@pytest.mark.parametrize("order", ["codecl_first", "schedule_first"])
def test_transfer_matrices_are_learned_stored_per_task_and_protected(order):
    bm, vals, a, _ = _data(shared_tasks=2)
    torch.manual_seed(0)
    model = TwoLayerBody(3)
    plugin = _plugin(num_free_dim=3, min_linear_fan_in=0)
    schedule, probe = GPMSchedulePlugin(vals, lr=0.2, patience=50), _StateAtEpoch()
    strategy = _strategy(model, plugin, schedule, order)
    strategy.plugins.append(probe)
    strategy.train(bm.train_stream[0])
    assert plugin.transfer == {}
    strategy.train(bm.train_stream[1])
    assert schedule.best_epoch[1] == 1
    assert set(plugin.transfer) == {1} and set(plugin.transfer[1]) == {"fc1", "fc2"}
    for name in ("fc1", "fc2"):
        entry = plugin.transfer[1][name]
        assert entry["basis"].shape == (model.get_submodule(name).in_features, 3)
        assert plugin.layer_log[1]["layers"][name]["transfer_ratio"] > 0.9   # same span
        # the stored M is the restored (epoch-1) one, not the last epoch's
        key = f"codecl.scale.{name}"
        torch.testing.assert_close(entry["scale"], probe.snapshots[1][0][key])
        assert (entry["scale"] - probe.snapshots[1][-1][key]).abs().max() > 1e-4
    # fc1's U lies in the inputs' span
    u = plugin.transfer[1]["fc1"]["basis"].double()
    p = a.double()
    assert (u - p @ (p.t() @ u)).norm() < 1e-4
    # the model's own state_dict is plain again, and a plain model loads it
    plain = TwoLayerBody(3)
    assert set(model.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    x = _inputs_in_span(a)
    task1 = _outputs(model, x, 1)
    assert (task1 - _outputs(plain, x, 1)).abs().max() > 1e-3       # M is in use for task 1
    torch.testing.assert_close(_outputs(model, x, 0), _outputs(plain, x, 0), rtol=0, atol=0)
    task0 = _outputs(model, x, 0)
    strategy.train(bm.train_stream[2])
    torch.testing.assert_close(_outputs(model, x, 0), task0, rtol=0, atol=2e-5)
    torch.testing.assert_close(_outputs(model, x, 1), task1, rtol=0, atol=2e-5)
    # one mixed mini-batch is routed per sample as separate single-task batches are
    labels = torch.tensor([0, 1] * 20)
    mixed = _outputs(model, x, labels)
    for t in (0, 1):
        torch.testing.assert_close(mixed[labels == t], _outputs(model, x, t)[labels == t],
                                   rtol=0, atol=1e-6)


# -- state ---------------------------------------------------------------------------------------
def test_state_dict_round_trip_resumes_exactly():
    bm, vals, model, plugin, strategy = _transfer_run()
    strategy.train(bm.train_stream[1])
    state = copy.deepcopy(plugin.state_dict())
    weights = copy.deepcopy(model.state_dict())
    stats = plugin.memory_stats()
    assert stats["persistent_bytes"] == sum(
        t.numel() * 4 for store in (state["conceptors"], *state["transfer"].values())
        for e in store.values() for t in e.values())
    assert stats["conceptor_bytes"] == sum(v.numel() * 4 for e in state["conceptors"].values()
                                           for v in e.values())
    assert stats["training_extra_bytes"] == 2 * 3 * 3 * 4      # the M gradients of fc1, fc2
    # a forward that passes no task label is served as the task_context's task
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        model.eval()
        with plugin.task_context(1):
            served = model.heads[1](model.features(x))
        torch.testing.assert_close(served, model(x, 1))
        assert (model.heads[1](model.features(x)) - served).abs().max() > 1e-4
    model.train()
    torch.manual_seed(7)
    strategy.train(bm.train_stream[2])

    resumed_model = TwoLayerBody(3)
    resumed_model.load_state_dict(weights)
    resumed = CODEPlugin()
    resumed.load_state_dict(state)
    resumed.restore_model_state(resumed_model)
    other = _strategy(resumed_model, resumed, GPMSchedulePlugin(vals, lr=0.2, patience=50),
                      "codecl_first", 2)
    assert not resumed_model.fc1.bias.requires_grad           # first-task-only, re-frozen
    torch.manual_seed(7)
    other.train(bm.train_stream[2])
    for (n, p), (_, q) in zip(model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(p, q), n
    for name, entry in plugin.conceptors.items():
        for k, v in entry.items():
            assert torch.equal(v, resumed.conceptors[name][k])
    assert resumed.layer_log == plugin.layer_log and resumed.tasks_trained == 3


def test_experiences_in_one_train_call_match_one_call_each():
    bm, _, model, plugin, strategy = _transfer_run()
    strategy.train(bm.train_stream[1])
    strategy.train(bm.train_stream[2])
    bm, _, model_b, together, strategy_b = _transfer_run()
    # _transfer_run trained task 0; tasks 1 and 2 now in one call (task 1 finishes in
    # before_training_exp of task 2, after Avalanche has updated the optimizer)
    strategy_b.train([bm.train_stream[1], bm.train_stream[2]])
    assert together.layer_log == plugin.layer_log and set(together.transfer) == {1, 2}
    for t, layers in plugin.transfer.items():
        for name, entry in layers.items():
            for k, v in entry.items():
                assert torch.equal(v, together.transfer[t][name][k]), (t, name, k)
    for (n, p), (_, q) in zip(model.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(p, q), n
    assert len(strategy_b.optimizer.param_groups) == 1


def test_state_dict_refuses_a_training_task():
    bm, _, _, plugin, strategy = _transfer_run(epochs=1)
    seen = {}

    class Checkpoint(SupervisedPlugin):
        def after_training_epoch(self, strategy, *args, **kwargs):
            with pytest.raises(RuntimeError, match="training"):
                plugin.state_dict()
            seen["groups"] = len(strategy.optimizer.param_groups)
    strategy.plugins.append(Checkpoint())
    strategy.train(bm.train_stream[1])
    assert seen["groups"] == 2 and len(strategy.optimizer.param_groups) == 1
    assert plugin.state_dict()["tasks_trained"] == 2


# -- guards --------------------------------------------------------------------------------------
def test_unsafe_optimizers_and_untasked_models_are_refused():
    bm, vals, _, _ = _data(shared_tasks=1)
    model = TwoLayerBody(2)
    strategy = _strategy(model, _plugin(), GPMSchedulePlugin(vals, lr=0.2), "codecl_first", 1,
                         optimizer=torch.optim.Adam(model.parameters()))
    with pytest.raises(UnsafeOptimizerError, match="Adam"):
        strategy.train(bm.train_stream[0])
    model = TwoLayerBody(2)
    strategy = _strategy(model, _plugin(), GPMSchedulePlugin(vals, lr=0.2), "codecl_first", 1,
                         optimizer=torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4))
    with pytest.raises(UnsafeOptimizerError, match="weight_decay"):
        strategy.train(bm.train_stream[0])
    # a model that gets no task labels cannot select transfer matrices
    torch.manual_seed(0)
    single = nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU(), nn.Linear(16, 2))
    strategy = _strategy(single, _plugin(num_free_dim=3, min_linear_fan_in=0),
                         GPMSchedulePlugin(vals, lr=0.2), "codecl_first", 1)
    strategy.train(bm.train_stream[0])
    with pytest.raises(ValueError, match="MultiTaskModule"):
        strategy.train(bm.train_stream[1])
    with pytest.raises(ValueError, match="one value or one per layer"):
        _strategy(TwoLayerBody(2), CODEPlugin(aperture=[1.0, 2.0, 3.0]), GPMSchedulePlugin(vals, lr=0.2),
                  "codecl_first", 1).train(bm.train_stream[0])
    with pytest.raises(ValueError, match="aperture_gain"):
        CODEPlugin(aperture_gain=1.5)
    with pytest.raises(ValueError, match="aperture"):
        CODEPlugin(aperture=[4.0, -1.0])


def test_recipe_uses_the_published_split_cifar100_values():
    (plugin,) = recipe_plugins({})
    assert isinstance(plugin, CODEPlugin)
    assert (plugin.apertures, plugin.aperture_gain, plugin.num_free_dim, plugin.lower_bound,
            plugin.basis_samples) == ([6.0], 0.95, 80, 0.2, 125)
    (plugin,) = recipe_plugins({"codecl_aperture": 4.0, "codecl_aperture_gain": 0.01, "gpm_samples": 50})
    assert (plugin.apertures, plugin.aperture_gain, plugin.basis_samples) == ([4.0], 0.01, 50)
