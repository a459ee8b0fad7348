"""TRGPPlugin: trust-region selection, scaled weight projection, basis rule, guarantee, resume.

Truths used: hand-built spectra and gradients (numpy, float64), float64 autograd of W_eff written
out term by term, and the outputs of old tasks (with their own Q) before and after later tasks.
The data follow tests/test_cl_fidelity.py: task 1's inputs lie in a 6-dim subspace A1 of R^20,
task 2's in A2 (4 directions of A1 and 2 new ones, so task 1 lies in its trust region), task 3's
anywhere; the validation labels are flipped, so the best epoch of every task is the first and
GPMSchedulePlugin restores the epoch-1 weights (and TRGP the epoch-1 Qs) at the end of a task.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.benchmarks import nc_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lance_cl.cl.plugins import TRGPPlugin
from lance_cl.cl.plugins.trgp import (projection_ratios, recipe_plugins, scaled_weight,
                                      select_trust_region, trgp_basis_update)
from lance_cl.cl.protocol import GPMSchedulePlugin, mixed_loader
from lance_cl.cl.subspace import UnsafeOptimizerError
from lance_cl.models.heads import MultiHeadModule
from lance_cl.strategies import quiet_evaluator

D_IN, N = 20, 96


def _orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))[0]


# -- (a) the pieces against hand computations ------------------------------------------------------
def test_projection_ratios_and_trust_region_match_a_hand_computed_case():
    r = _orthonormal(6, 6, 0)                       # directions r_0..r_5 of R^6
    grad = np.outer([1.0, -2.0], r[:, 0]) * 3.0 + np.outer([0.5, 1.0], r[:, 1]) + np.outer([1.0, 0.0], r[:, 4])
    bases = [r[:, [0]], r[:, [1, 2]], r[:, [3]], r[:, [0, 4]]]
    # ||G B B^T||^2 = sum over the basis directions of ||G r_i||^2: 45, 1.25, 0, 1 (per direction)
    energy = {0: 45.0, 1: 1.25, 2: 0.0, 3: 0.0, 4: 1.0}
    total = sum(energy.values())
    expected = [np.sqrt(sum(energy[i] for i in idx) / total) for idx in ([0], [1, 2], [3], [0, 4])]
    ratios = projection_ratios(torch.tensor(grad, dtype=torch.float32),
                               [torch.tensor(b, dtype=torch.float32) for b in bases])
    assert ratios.dtype == torch.float64
    np.testing.assert_allclose(ratios.numpy(), expected, rtol=1e-6, atol=1e-7)
    # ratios: 0.976, 0.163, 0, 0.987 -> top 2 above 0.5 are tasks 3 then 0
    assert select_trust_region(ratios, 0.5, 2) == [3, 0]
    assert select_trust_region(ratios, 0.5, 1) == [3]
    assert select_trust_region(ratios, 0.98, 2) == [3]         # task 0 is in the top 2 but below
    assert select_trust_region(ratios, 0.1, 3) == [3, 0, 1]
    assert select_trust_region(torch.tensor([0.3, 0.2]), 0.5, 2) == []
    assert projection_ratios(torch.zeros(2, 6), [torch.tensor(r[:, :2])]).tolist() == [0.0]


def test_basis_rule_sorts_old_and_new_energies_together():
    # C = R diag(4, 3, 2, 0.6, 0.4) R^T, old basis M = (r_1, r_4), eps = 0.93 of tr(C) = 10
    r = _orthonormal(5, 5, 1)
    lam = np.array([4.0, 3.0, 2.0, 0.6, 0.4])
    gram = torch.tensor((r * lam) @ r.T)
    old = torch.tensor(r[:, [1, 4]], dtype=torch.float32)
    task_basis, added = trgp_basis_update(gram, old, 0.93)
    # sorted energies 4 (r_0, new), 3 (r_1, old), 2 (r_2, new), 0.6 (r_3, new), 0.4 (r_4, old):
    # 4 + 3 + 2 = 9 < 9.3 <= 9.6, so r_0, r_1, r_2, r_3 form the task's basis; r_0, r_2, r_3 are new
    np.testing.assert_allclose(np.abs(task_basis.numpy().T @ r[:, [0, 1, 2, 3]]), np.eye(4), atol=1e-6)
    np.testing.assert_allclose(np.abs(added.numpy().T @ r[:, [0, 2, 3]]), np.eye(3), atol=1e-6)
    # GPM's rule counts all of M's energy (3.4) first and stops after r_0 and r_2
    from lance_cl.core.linalg import grow_basis
    assert grow_basis(gram, old, 0.93)[0].shape[1] == 2
    # first task: GPM's rule on C alone (4 + 3 >= 0.65 * 10)
    first, same = trgp_basis_update(gram, None, 0.65)
    assert first.shape[1] == 2 and same is first
    np.testing.assert_allclose(np.abs(first.numpy().T @ r[:, :2]), np.eye(2), atol=1e-6)


def _w_eff_reference(w: Tensor, bases: list[Tensor], scales: list[Tensor]) -> Tensor:
    """W - sum_j W B_j B_j^T + sum_j W B_j Q_j B_j^T, float64, fan-in view (C_out, d)."""
    out = w.clone()
    for b, q in zip(bases, scales):
        out = out - w @ b @ b.T + w @ b @ q @ b.T
    return out


def test_scaled_weight_and_its_gradients_match_float64_autograd():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    bases = [torch.tensor(_orthonormal(5, 2, 2)), torch.tensor(_orthonormal(5, 3, 3))]
    scales = [torch.eye(2, dtype=torch.float64) + 0.3 * torch.randn(2, 2, generator=gen, dtype=torch.float64),
              torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(3, 3, generator=gen, dtype=torch.float64)]
    probe = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    grads = []
    for fn, dtype in ((scaled_weight, torch.float32), (_w_eff_reference, torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in [w, *scales]]
        out = fn(leaves[0], [b.to(dtype) for b in bases], leaves[1:])
        grads.append((out.detach(), *torch.autograd.grad((out * probe.to(dtype)).sum(), leaves)))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    # identity scales leave W unchanged
    torch.testing.assert_close(scaled_weight(w, bases, [torch.eye(2), torch.eye(3)]), w)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_hooked_layer_applies_the_stored_scales_of_its_task_only(kind):
    """The forward hook = the layer with W_eff (float64 reference), gradients in W and Q too;
    other task labels (and no label) see the plain layer."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4) if kind == "linear" else nn.Conv2d(2, 3, 2, padding=1)
    model = nn.Sequential(layer)
    d = 6 if kind == "linear" else 8
    x = torch.randn(5, 6) if kind == "linear" else torch.randn(5, 2, 4, 4)
    plugin = TRGPPlugin(layers=["0"], heads=[])
    basis = torch.tensor(_orthonormal(d, 3, 4), dtype=torch.float32)
    q = (torch.eye(3) + 0.2 * torch.randn(3, 3)).requires_grad_()
    plugin.task_bases = {"0": [basis]}
    plugin.selected = {1: {"0": [0]}}
    plugin.scales = {1: {"0": [q]}}
    plugin.attach(model)
    with torch.no_grad():
        plain = model(x)
    with plugin.task_scales(0):
        torch.testing.assert_close(model(x), plain)
    with plugin.task_scales(1):
        out = model(x)
    probe = torch.randn_like(out)
    gw, gq = torch.autograd.grad((out * probe).sum(), [layer.weight, q])

    w64 = layer.weight.detach().double().requires_grad_()
    q64 = q.detach().double().requires_grad_()
    w_eff = _w_eff_reference(w64.reshape(w64.shape[0], -1), [basis.double()], [q64]).view_as(w64)
    b64 = layer.bias.detach().double()
    ref = F.linear(x.double(), w_eff, b64) if kind == "linear" else F.conv2d(x.double(), w_eff, b64, padding=1)
    rw, rq = torch.autograd.grad((ref * probe.double()).sum(), [w64, q64])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gq.double(), rq, rtol=1e-5, atol=1e-5)
    assert (out - plain).abs().max() > 1e-2
    # mixed labels: each sample gets its own task's layer
    labels = torch.tensor([1, 0, 1, 0, 0])
    with plugin.task_scales(labels), torch.no_grad():
        mixed = model(x)
    torch.testing.assert_close(mixed[labels == 1], out.detach()[labels == 1])
    torch.testing.assert_close(mixed[labels == 0], plain[labels == 0])


# -- (b) the guarantee in real strategies ------------------------------------------------------------
class TwoLayerBody(MultiHeadModule):
    """fc1 (20 -> hidden) -> act -> fc2 (hidden -> 12) -> ReLU -> one head per task (3 tasks)."""

    def __init__(self, hidden: int = 16, act: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, hidden)
        self.act = act or nn.Identity()
        self.fc2 = nn.Linear(hidden, 12)
        self._make_heads(12, 3, 2)

    def features(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc2(self.act(self.fc1(x))))


def _spans() -> list[Tensor]:
    q = torch.tensor(_orthonormal(D_IN, 8, 5), dtype=torch.float32)
    return [q[:, :6], torch.cat([q[:, :4], q[:, 6:8]], 1)]      # A1, A2 (4 shared directions)


def _tasks(n: int = N) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and labels of the three tasks, ``n`` samples each."""
    g = torch.Generator().manual_seed(0)
    a1, a2 = _spans()
    z1, z2 = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
    x3 = torch.randn(n, D_IN, generator=g)
    xs = [z1 @ a1.t(), z2 @ a2.t(), x3]
    ys = [(z1[:, 0] > 0).long(), 2 + (z2[:, 1] + z2[:, 4] > 0).long(), 4 + (x3[:, :3].sum(1) > 0).long()]
    return xs, ys


def _benchmark(xs: list[Tensor], ys: list[Tensor]):
    data = TensorDataset(torch.cat(xs), torch.cat(ys))
    return nc_benchmark(data, data, n_experiences=3, task_labels=True, shuffle=False,
                        fixed_class_order=list(range(6)), class_ids_from_zero_in_each_exp=True)


def _data():
    bm = _benchmark(*_tasks())
    g = torch.Generator().manual_seed(1)
    a1, a2 = _spans()
    zv1, zv2 = torch.randn(32, 6, generator=g), torch.randn(32, 6, generator=g)
    xv3 = torch.randn(32, D_IN, generator=g)
    vals = [TensorDataset(zv1 @ a1.t(), (zv1[:, 0] <= 0).long()),          # flipped labels
            TensorDataset(zv2 @ a2.t(), (zv2[:, 1] + zv2[:, 4] <= 0).long()),
            TensorDataset(xv3, (xv3[:, :3].sum(1) <= 0).long())]
    return bm, vals


def _plugin(**options) -> TRGPPlugin:
    return TRGPPlugin(eps=0.9999, eps_step=0.0, basis_samples=10 * N, selection_samples=N, **options)


def _strategy(plugins, epochs: int = 4, model=None, optimizer=None):
    """Naive SGD (lr 0.2, batch 16) with ``plugins``, quiet evaluator."""
    torch.manual_seed(0)
    model = model or TwoLayerBody()
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.2)
    return Naive(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
                 train_mb_size=16, train_epochs=epochs, eval_mb_size=64, plugins=plugins,
                 evaluator=quiet_evaluator())


def _outputs(model: nn.Module, x: Tensor, task: int) -> Tensor:
    """Eval-mode outputs (float64) of task ``task`` on ``x``; the model is left in train mode."""
    model.eval()
    try:
        with torch.no_grad():
            return model(x, task).double()
    finally:
        model.train()


class _LiveScales(SupervisedPlugin):
    """The TRGP param group's values after every epoch of experience 1."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[list[Tensor]] = []

    def after_training_epoch(self, strategy, *args, **kwargs):
        if strategy.experience.current_experience == 1:
            self.epochs.append([p.detach().clone() for p in strategy.optimizer.param_groups[-1]["params"]])


def _reference_ratios(model: nn.Module, dataset, plugin: TRGPPlugin, name: str) -> np.ndarray:
    """Trust-region ratios of a layer from a plain copy of the model, in numpy float64."""
    plain = TwoLayerBody()
    plain.load_state_dict(model.state_dict())
    plain.eval()
    x, y, t = next(iter(mixed_loader(dataset, N)))
    loss = F.cross_entropy(plain(x, t), y)
    g = torch.autograd.grad(loss, plain.get_submodule(name).weight)[0].double().numpy()
    return np.array([np.linalg.norm(g @ b @ b.T) / np.linalg.norm(g)
                     for b in (b.double().numpy() for b in plugin.task_bases[name])])


@pytest.mark.parametrize("order", ["trgp_first", "schedule_first"])
def test_old_tasks_keep_their_outputs_with_their_own_scales(order):
    bm, vals = _data()
    plugin = _plugin()
    schedule = GPMSchedulePlugin(vals, lr=0.2, patience=50)
    live = _LiveScales()
    plugins = [plugin, schedule] if order == "trgp_first" else [schedule, plugin]
    strategy = _strategy(plugins + [live])
    model = strategy.model
    a1, a2 = _spans()
    g = torch.Generator().manual_seed(9)
    probes = [torch.randn(40, 6, generator=g) @ a1.t(), torch.randn(40, 6, generator=g) @ a2.t()]
    recorded: list[Tensor] = []
    weights_after_task1 = None
    for t in range(3):
        if t == 1:
            weights_after_task1 = {k: v.clone() for k, v in model.state_dict().items()}
        strategy.train(bm.train_stream[t])
        assert schedule.best_epoch[t] == 1 and len(schedule.history[t]) == 4
        for j, before in enumerate(recorded):
            torch.testing.assert_close(_outputs(model, probes[j], j), before, rtol=0, atol=2e-5,
                                       msg=f"task {j + 1} after task {t + 1}")
        if t < 2:
            recorded.append(_outputs(model, probes[t], t))
    # task 2 reused task 1 on both layers, with ratios from its gradient before training
    assert plugin.task_labels == [0, 1, 2]
    assert plugin.selected[1] == {"fc1": [0], "fc2": [0]}
    model_after1 = TwoLayerBody()
    model_after1.load_state_dict(weights_after_task1)
    for name in ("fc1", "fc2"):
        logged = plugin.layer_log[1]["layers"][name]["trust_ratios"]
        plugin_t1 = TRGPPlugin()
        plugin_t1.task_bases = {name: plugin.task_bases[name][:1]}
        np.testing.assert_allclose(logged, _reference_ratios(model_after1, bm.train_stream[1].dataset,
                                                             plugin_t1, name), rtol=1e-4)
        assert logged[0] > 0.5
    # the stored Qs are those of the restored epoch (1), which differ from the last epoch's
    stored = [q for name in ("fc1", "fc2") for q in plugin.scales[1][name]]
    for q, at_epoch1, at_last in zip(stored, live.epochs[0], live.epochs[-1]):
        torch.testing.assert_close(q, at_epoch1, rtol=0, atol=0)
        assert (at_last - at_epoch1).abs().max() > 1e-4
    assert plugin.layer_log[1]["scales_epoch"] == 1
    assert max((q - torch.eye(q.shape[0])).abs().max() for q in stored) > 1e-3
    # the Qs matter: the plain network (a plain model loads the state_dict) answers differently
    plain = TwoLayerBody()
    plain.load_state_dict(model.state_dict())
    assert (_outputs(plain, probes[1], 1) - _outputs(model, probes[1], 1)).abs().max() > 1e-3
    # no TRGP param group left in the optimizer
    assert len(strategy.optimizer.param_groups) == 1


def test_bases_grow_from_the_inputs_a_task_sees_with_its_own_scales():
    """Task 2's outputs (with its Qs) on its own training inputs survive task 3 to rounding. The
    body has tanh between fc1 and fc2, so fc2's inputs under fc1's W_eff leave the span of those
    under W, and 24 samples per task leave fc2 room to learn. With the bases grown from the
    unscaled network, as the official code does, these outputs moved by 1.7e-4."""
    n = 24
    xs, ys = _tasks(n)
    small = _benchmark(xs, ys)
    plugin = TRGPPlugin(eps=1.0, eps_step=0.0, basis_samples=10 * n, selection_samples=n)
    torch.manual_seed(0)
    strategy = _strategy([plugin], epochs=6, model=TwoLayerBody(96, nn.Tanh()))
    model = strategy.model
    strategy.train(small.train_stream[0])
    strategy.train(small.train_stream[1])
    assert plugin.selected[1] == {"fc1": [0], "fc2": [0]} and plugin.bases["fc2"].shape[1] < 96
    before, fc2 = _outputs(model, xs[1], 1), model.fc2.weight.detach().clone()
    strategy.train(small.train_stream[2])
    assert (model.fc2.weight.detach() - fc2).abs().max() > 1e-3
    torch.testing.assert_close(_outputs(model, xs[1], 1), before, rtol=0, atol=2e-6)


def test_three_experiences_in_one_train_call_match_three_calls():
    bm, vals = _data()
    runs = []
    for one_call in (False, True):
        plugin = _plugin()
        strategy = _strategy([plugin, GPMSchedulePlugin(vals, lr=0.2, patience=50)], epochs=2)
        torch.manual_seed(3)
        if one_call:
            strategy.train(list(bm.train_stream))
        else:
            for exp in bm.train_stream:
                strategy.train(exp)
        runs.append(plugin)
    ref, plugin = runs
    assert plugin.layer_log == ref.layer_log and plugin.selected == ref.selected
    assert plugin.selected[1] and plugin.layer_log[1]["scales_epoch"] == 1
    for t, per in ref.scales.items():
        for name, qs in per.items():
            for q, q_ref in zip(plugin.scales[t][name], qs):
                torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-6)
    for name, bases in ref.task_bases.items():
        for b, b_ref in zip(plugin.task_bases[name], bases):
            torch.testing.assert_close(b, b_ref, rtol=0, atol=1e-5)


def test_a_model_without_task_inputs_gets_the_scales_of_the_strategy_batches():
    """Single-head nn.Sequential: training uses the live Qs, Avalanche's eval the batch labels."""
    bm, _ = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU(), nn.Linear(16, 2))
    plugin = _plugin()

    class Outputs(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[Tensor, Tensor]] = []

        def after_eval_forward(self, strategy, *args, **kwargs):
            self.seen.append((strategy.mb_x.clone(), strategy.mb_output.detach().clone()))
    outputs = Outputs()
    strategy = _strategy([plugin, outputs], epochs=2, model=model)
    for t in range(2):
        strategy.train(bm.train_stream[t])
    assert plugin.protected_names(model) == ["0"] and plugin.selected[1] == {"0": [0]}
    strategy.eval([bm.test_stream[1]])
    x = torch.cat([s[0] for s in outputs.seen])
    seen = torch.cat([s[1] for s in outputs.seen])
    model.eval()
    with torch.no_grad():
        with plugin.task_scales(1):
            torch.testing.assert_close(seen, model(x))
        assert (model(x) - seen).abs().max() > 1e-4           # unlabelled forward: plain layer


# -- (c) exact resume -------------------------------------------------------------------------------
def test_state_dict_round_trip_resumes_exactly():
    bm, _ = _data()
    plugin = _plugin()
    strategy = _strategy([plugin], epochs=2)
    for t in range(2):
        torch.manual_seed(10 + t)
        strategy.train(bm.train_stream[t])
    buffer = io.BytesIO()
    torch.save({"model": strategy.model.state_dict(), "plugin": plugin.state_dict(),
                "optimizer": strategy.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert set(saved["model"]) == set(TwoLayerBody().state_dict())

    resumed_plugin = _plugin()
    resumed = _strategy([resumed_plugin], epochs=2)
    resumed.model.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed_plugin.load_state_dict(saved["plugin"])
    resumed_plugin.restore_model_state(resumed.model)
    assert plugin.selected[1], "task 2 should use scales"
    x = torch.randn(8, D_IN)
    torch.testing.assert_close(_outputs(resumed.model, x, 1), _outputs(strategy.model, x, 1), rtol=0, atol=0)
    assert not resumed.model.fc1.bias.requires_grad                 # first-task-only freezing
    assert resumed_plugin.memory_stats() == plugin.memory_stats()
    assert plugin.training_extra_bytes() > (D_IN ** 2 + 16 ** 2) * 4     # Qs of task 2 counted

    for strat in (strategy, resumed):
        torch.manual_seed(12)
        strat.train(bm.train_stream[2])
    for (name, p), q in zip(strategy.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    a, b = plugin.state_dict(), resumed_plugin.state_dict()
    assert a["selected"] == b["selected"] and a["task_labels"] == b["task_labels"] == [0, 1, 2]
    for t in a["scales"]:
        for name in a["scales"][t]:
            for qa, qb in zip(a["scales"][t][name], b["scales"][t][name]):
                torch.testing.assert_close(qb, qa, rtol=0, atol=0)
    for name in a["bases"]:
        torch.testing.assert_close(b["bases"][name], a["bases"][name], rtol=0, atol=0)


def test_state_dict_is_refused_while_a_task_trains():
    bm, _ = _data()
    plugin = _plugin()
    seen = {}

    class Checkpoint(SupervisedPlugin):
        def after_training_epoch(self, strategy, *args, **kwargs):
            with pytest.raises(RuntimeError, match="training"):
                plugin.state_dict()
            seen["checked"] = True
    strategy = _strategy([plugin, Checkpoint()], epochs=1)
    strategy.train(bm.train_stream[0])
    assert seen["checked"] and plugin.state_dict()["task_labels"] == [0]


# -- (d) refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda p: torch.optim.Adam(p, lr=1e-3), "Adam rescales"),
    (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-4), "weight_decay")])
def test_unsafe_optimizers_are_refused(make, match):
    bm, _ = _data()
    model = TwoLayerBody()
    strategy = _strategy([_plugin()], epochs=1, model=model, optimizer=make(model.parameters()))
    with pytest.raises(UnsafeOptimizerError, match=match):
        strategy.train(bm.train_stream[0])


def test_repeated_task_labels_and_bad_options_are_refused():
    bm, _ = _data()
    strategy = _strategy([_plugin()], epochs=1)
    strategy.train(bm.train_stream[0])
    with pytest.raises(ValueError, match="already trained"):
        strategy.train(bm.train_stream[0])
    with pytest.raises(ValueError, match="trust_threshold"):
        TRGPPlugin(trust_threshold=1.5)
    with pytest.raises(ValueError, match="top_k"):
        TRGPPlugin(top_k=0)


def test_recipe_reads_the_benchmark_defaults():
    (plugin,) = recipe_plugins({"eps": 0.965, "eps_step": 0.0, "gpm_samples": 100, "trgp_samples": 500})
    assert isinstance(plugin, TRGPPlugin)
    assert (plugin.eps, plugin.eps_step, plugin.basis_samples) == (0.965, 0.0, 100)
    assert (plugin.trust_threshold, plugin.top_k, plugin.selection_samples) == (0.5, 2, 500)


def test_memory_figures_count_bases_scales_and_projections():
    bm, _ = _data()
    plugin = _plugin()
    strategy = _strategy([plugin], epochs=1)
    extra_during = {}

    class Probe(SupervisedPlugin):
        def after_training_epoch(self, strategy, *args, **kwargs):
            extra_during["bytes"] = plugin.training_extra_bytes()
    strategy.plugins.append(Probe())
    for t in range(2):
        strategy.train(bm.train_stream[t])
    bases = sum(b.numel() * 4 for b in plugin.bases.values())
    own = sum(b.numel() * 4 for bs in plugin.task_bases.values() for b in bs)
    scales = sum(q.numel() * 4 for qs in plugin.scales[1].values() for q in qs)
    assert scales > 0
    assert plugin.persistent_bytes() == bases + own + scales
    # while task 2 trained: d x d projections of the bases after task 1, plus live Qs and grads
    projections = sum(d * d * 4 for d in (D_IN, 16))
    assert extra_during["bytes"] == projections + 2 * scales
    # between tasks: the Qs task 2 trained with (figures a run records after each task)
    assert plugin.training_extra_bytes() == projections + 2 * scales
