"""LanceCLPlugin, GPMPlugin and SGPPlugin inside real Avalanche strategies.

The guarantee is tested directly: after a later task, every protected layer's weight change
annihilates the span of the earlier tasks' protected basis, so old inputs inside that span give
the same layer outputs.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from avalanche.benchmarks import nc_benchmark
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from torch.utils.data import TensorDataset

from lance_cl.cl.plugins import GPMPlugin, LanceCLPlugin, SGPPlugin
from lance_cl.cl.subspace import UnsafeOptimizerError
from lance_cl.layers import CompressedLayer, LayerMode
from lance_cl.models import SmallCNN

PROTECTED = ["conv1", "conv2", "fc1"]


def digits_benchmark(n_tasks=3):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    keep = y < 2 * n_tasks
    x, y = x[keep], y[keep]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(y))
    return nc_benchmark(TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:]),
                        n_experiences=n_tasks, task_labels=True,
                        class_ids_from_zero_in_each_exp=True,
                        fixed_class_order=list(range(2 * n_tasks)))


def make_model(n_tasks=3):
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, n_classes=2, n_tasks=n_tasks, input_size=8)


def protected_names(model):
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not n.startswith("heads")]


def strategy_with(plugin, model, lr=0.05, epochs=2, optimizer=None):
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    return Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=32,
                 train_epochs=epochs, eval_mb_size=64, plugins=[plugin],
                 evaluator=EvaluationPlugin(loggers=[]))


def weights(model):
    return {n: model.get_submodule(n).weight.detach().clone() for n in protected_names(model)}


@pytest.mark.parametrize("plugin_cls", [LanceCLPlugin, GPMPlugin, SGPPlugin])
def test_old_task_outputs_inside_protected_span_do_not_change(plugin_cls):
    """LANCE-CL and GPM: exact for the whole span. SGP scales steps along basis vector i by
    (1 - lambda_i), so only its fully important directions (lambda_i = 1) are frozen."""
    bm = digits_benchmark()
    model = make_model()
    plugin = plugin_cls(eps=0.9, eps_step=0.02)
    strategy = strategy_with(plugin, model)
    strategy.train(bm.train_stream[0])
    w0 = weights(model)
    bases0 = {n: b.clone() for n, b in plugin.bases.items()}
    importances0 = {n: v.clone() for n, v in getattr(plugin, "importances", {}).items()}
    norm_params0 = {n: p.detach().clone() for n, p in model.named_parameters()
                    if p.dim() == 1 and not n.startswith("heads")}
    head0 = model.heads[0].weight.detach().clone()
    for exp in bm.train_stream[1:]:
        strategy.train(exp)
    w2 = weights(model)
    changed = False
    for name, basis in bases0.items():
        p = basis.double()
        if plugin_cls is SGPPlugin:
            # importances only grow (accumulated, clipped), so lambda_i = 1 after task 1 stays 1
            p = p[:, importances0[name] >= 1 - 1e-6]
        assert p.shape[1] > 0
        delta = (w2[name] - w0[name]).double().reshape(w0[name].shape[0], -1)
        changed |= delta.abs().max() > 1e-4
        # the weight change annihilates span(P): old inputs in the span give the same output
        assert (delta @ p).abs().max() < 1e-4 * max(1.0, delta.abs().max().item())
        x_old = (p @ torch.randn(p.shape[1], 5, dtype=torch.float64)).t()     # 5 inputs in span(P)
        before = x_old @ w0[name].double().reshape(w0[name].shape[0], -1).t()
        after = x_old @ w2[name].double().reshape(w2[name].shape[0], -1).t()
        torch.testing.assert_close(after, before, rtol=0, atol=1e-4)
    assert changed, "later tasks must still learn"
    for n, v in norm_params0.items():     # BN affine / biases frozen after the first task
        torch.testing.assert_close(dict(model.named_parameters())[n].detach(), v)
    torch.testing.assert_close(model.heads[0].weight.detach(), head0)


@pytest.mark.parametrize("plugin_cls", [LanceCLPlugin, GPMPlugin, SGPPlugin])
def test_grown_bases_are_orthonormal_and_extend_earlier_ones(plugin_cls):
    bm = digits_benchmark()
    model = make_model()
    plugin = plugin_cls(eps=0.9, eps_step=0.03)
    strategy = strategy_with(plugin, model, epochs=1)
    history = []
    for exp in bm.train_stream:
        strategy.train(exp)
        history.append({n: b.clone() for n, b in plugin.bases.items()})
    for name, final in history[-1].items():
        gram = final.double().t() @ final.double()
        torch.testing.assert_close(gram, torch.eye(final.shape[1], dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        for earlier in history[:-1]:
            k = earlier[name].shape[1]
            assert k <= final.shape[1]
            torch.testing.assert_close(final[:, :k], earlier[name])


def test_lance_training_factor_is_orthogonal_to_protected_basis_and_cores_are_small():
    bm = digits_benchmark()
    model = make_model()
    plugin = LanceCLPlugin(eps=0.9, eps_step=0.02)
    strategy = strategy_with(plugin, model, epochs=1)
    strategy.train(bm.train_stream[0])
    bases = {n: b.clone() for n, b in plugin.bases.items()}
    # calibrate task 2 without training: factors are fixed in before_training_exp
    checked = {}
    orig = plugin.prepare_task

    def prepare_and_check(strat):
        orig(strat)
        for name in PROTECTED:
            layer = model.get_submodule(name)
            assert isinstance(layer, CompressedLayer)
            fan_in = 1 if isinstance(layer, nn.Conv2d) else layer.compressor.n_modes - 1
            u = layer.compressor.factor(fan_in)
            if u is None:
                assert name in plugin.frozen
                continue
            assert (u.double().t() @ bases[name].double()).abs().max() < 1e-5
            checked[name] = u.shape[1]
    plugin.prepare_task = prepare_and_check
    strategy.train(bm.train_stream[1])
    assert checked
    log = plugin.layer_log[1]["layers"]
    for name, rank in checked.items():
        assert log[name]["train_rank"] == rank


def test_a_recomputed_stem_conv_keeps_its_position_mode_whole():
    """conv1 sits in SmallCNN's stem: recomputed in backward once compacted, so it gets no
    position factor (its core is never stored); conv2 still gets one."""
    from lance_cl import compact_activations

    bm = digits_benchmark(1)
    ranks = {}
    for recompute in ((), ("stem",)):
        model = make_model(1)
        compact_activations(model, recompute=recompute)
        plugin = LanceCLPlugin(eps=0.9, position_eps=0.5)
        strategy_with(plugin, model, epochs=1).train(bm.train_stream[0])
        ranks[recompute] = {n: plugin.layer_log[0]["layers"][n]["ranks"] for n in ("conv1", "conv2")}
    assert ranks[()]["conv1"][2] is not None and ranks[()]["conv2"][2] is not None
    assert ranks[("stem",)]["conv1"][2] is None
    assert ranks[("stem",)]["conv2"][2] is not None


def test_first_task_full_backprop_variant_trains_task_one_uncompressed():
    bm = digits_benchmark(2)
    model = make_model(2)
    plugin = LanceCLPlugin(eps=0.9, first_task="full")
    strategy = strategy_with(plugin, model, epochs=1)
    strategy.train(bm.train_stream[0])
    assert all(model.get_submodule(n).mode is LayerMode.FULL_BACKPROP for n in PROTECTED)
    strategy.train(bm.train_stream[1])
    assert all(model.get_submodule(n).mode is LayerMode.COMPRESSED for n in PROTECTED)


def test_layer_with_nothing_left_is_frozen_for_the_task():
    bm = digits_benchmark(2)
    model = make_model(2)
    plugin = LanceCLPlugin(eps=0.9, small_layer_dim=0)
    strategy = strategy_with(plugin, model, epochs=1)
    strategy.train(bm.train_stream[0])
    d = plugin.bases["conv1"].shape[0]
    plugin.bases["conv1"] = torch.eye(d)          # everything protected
    w = model.conv1.weight.detach().clone()
    strategy.train(bm.train_stream[1])
    assert plugin.layer_log[1]["layers"]["conv1"]["frozen"]
    torch.testing.assert_close(model.conv1.weight.detach(), w)
    assert model.conv1.weight.requires_grad       # unfrozen again after the task


def test_unsafe_optimizers_are_refused_unless_allowed():
    bm = digits_benchmark(2)
    for opt_fn, match in [(lambda p: torch.optim.Adam(p, lr=1e-3), "Adam rescales"),
                          (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-4), "weight_decay")]:
        for cls in (LanceCLPlugin, GPMPlugin):
            model = make_model(2)
            strategy = strategy_with(cls(), model, optimizer=opt_fn(model.parameters()))
            with pytest.raises(UnsafeOptimizerError, match=match):
                strategy.train(bm.train_stream[0])
    model = make_model(2)
    strategy = strategy_with(GPMPlugin(allow_unsafe_optimizer=True), model,
                             optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), epochs=1)
    strategy.train(bm.train_stream[0])
    assert strategy.plugins[0].tasks_trained == 1


def test_momentum_state_is_reset_at_each_task():
    bm = digits_benchmark(2)
    model = make_model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plugin = GPMPlugin(eps=0.9)
    strategy = strategy_with(plugin, model, optimizer=opt, epochs=1)
    strategy.train(bm.train_stream[0])
    w = model.get_submodule("fc1").weight
    assert "momentum_buffer" in opt.state[w]
    seen = {}
    orig = plugin.prepare_task

    def spy(strat):
        seen["state"] = dict(strat.optimizer.state.get(w, {}))
        orig(strat)
    plugin.prepare_task = spy
    strategy.train(bm.train_stream[1])
    assert seen["state"] == {}


def test_gpm_projects_gradients_and_sgp_importances_follow_the_formula():
    bm = digits_benchmark(2)
    model = make_model(2)
    plugin = SGPPlugin(eps=0.9, alpha=10.0)
    strategy = strategy_with(plugin, model, epochs=1)
    strategy.train(bm.train_stream[0])
    # first task: importances from the singular values of the representation
    from lance_cl.cl.plugins.base import forward_batch
    from lance_cl.cl.subspace import collect_fan_in_grams
    from lance_cl.cl.protocol import mixed_loader
    loader = mixed_loader(bm.train_stream[0].dataset, 128)   # the plugin's sample order
    rows: dict = {}
    grams = collect_fan_in_grams(model, ["fc1", "conv1"], loader, forward_batch, max_samples=125,
                                 rows=rows)
    assert rows == {"fc1": 125, "conv1": 125 * 8 * 8}        # samples; samples x positions
    p = plugin.bases["fc1"].double()
    s = torch.einsum("dk,de,ek->k", p, grams["fc1"], p).sqrt()
    expected = 11 * s / (10 * s + s.max())
    torch.testing.assert_close(plugin.importances["fc1"].double(), expected, rtol=1e-4, atol=1e-5)
    # projection in after_backward: g <- g - g M diag(lambda) M^T
    gpm = GPMPlugin(eps=0.9)
    gpm.bases = {"fc1": plugin.bases["fc1"].clone()}
    gpm._names = ["fc1"]
    gpm._projections = {"fc1": gpm.projection_matrix("fc1")}
    model.fc1.weight.grad = torch.randn_like(model.fc1.weight)
    gpm.after_backward(type("S", (), {"model": model})())
    assert (model.fc1.weight.grad.double() @ p).abs().max() < 1e-5


def test_plugin_state_round_trips():
    bm = digits_benchmark(2)
    model = make_model(2)
    plugin = SGPPlugin(eps=0.9)
    strategy_with(plugin, model, epochs=1).train(bm.train_stream[0])
    state = copy.deepcopy(plugin.state_dict())
    fresh = SGPPlugin(eps=0.5)
    fresh.load_state_dict(state)
    assert fresh.tasks_trained == 1 and fresh.eps == 0.9
    for n in plugin.bases:
        assert torch.equal(fresh.bases[n], plugin.bases[n])
        assert torch.equal(fresh.importances[n], plugin.importances[n])
    assert fresh.memory_stats() == plugin.memory_stats()


def test_memory_figures_lance_holds_factors_gpm_holds_projections():
    bm = digits_benchmark(2)
    stats = {}
    for cls in (LanceCLPlugin, GPMPlugin):
        model = make_model(2)
        plugin = cls(eps=0.9)
        strategy_with(plugin, model, epochs=1).train(bm.train_stream[0])
        stats[cls.name] = plugin.memory_stats()
        dims = {n: b.shape for n, b in plugin.bases.items()}
        assert stats[cls.name]["persistent_bytes"] == sum(4 * a * b for a, b in dims.values())
    gpm_extra = sum(4 * d * d for d, _ in dims.values())
    assert stats["gpm"]["training_extra_bytes"] == gpm_extra
    assert 0 < stats["lance"]["training_extra_bytes"] < gpm_extra


@pytest.mark.parametrize("name", ["lance", "lance_paper", "gpm", "sgp"])
def test_recipes_take_thresholds_and_basis_samples_from_the_benchmark(name):
    from lance_cl.strategies import build_strategy

    strategy = build_strategy(name, make_model(2), {"eps": 0.965, "eps_step": 0.0,
                                                   "gpm_samples": 100, "lr": 0.1})
    plugin = strategy.plugins[0]
    assert (plugin.eps, plugin.eps_step, plugin.basis_samples) == (0.965, 0.0, 100)


def test_lance_residual_rule_options_are_checked():
    with pytest.raises(ValueError, match="cannot be combined"):
        LanceCLPlugin(train_eps=0.98, train_energy=0.9)
    with pytest.raises(ValueError, match="cannot be combined"):
        LanceCLPlugin(train_eps=0.98, train_max_rank_fraction=0.5)
    with pytest.raises(ValueError, match="train_max_rank"):
        LanceCLPlugin(train_max_rank=0)
    with pytest.raises(ValueError, match="train_energy"):
        LanceCLPlugin(train_energy=1.5)
    capped = LanceCLPlugin(train_max_rank=7, train_max_rank_fraction=0.1)
    assert capped.train_energy == 1.0          # a cap alone keeps the top directions up to it
    assert (capped.rank_cap(200), capped.rank_cap(30), capped.rank_cap(5)) == (7, 3, 1)
    assert LanceCLPlugin().rank_cap(100) is None


def test_lance_residual_rule_trains_where_the_total_energy_rule_freezes():
    bm = digits_benchmark(2)
    logs = {}
    for rule in ({"train_eps": 0.5}, {"train_energy": 0.5, "train_max_rank": 3}):
        model = make_model(2)
        plugin = LanceCLPlugin(eps=0.9, small_layer_dim=0, **rule)
        strategy = strategy_with(plugin, model, epochs=1)
        for exp in bm.train_stream:
            strategy.train(exp)
        logs[next(iter(rule))] = plugin.layer_log[1]["layers"]
    for name in PROTECTED:
        old, new = logs["train_eps"][name], logs["train_energy"][name]
        assert old["train_rule"] == "total_energy" and old["train_threshold"] == 0.5
        assert old["train_energy_covered_by_P"] > 0.5 and old["frozen"] and old["train_rank"] == 0
        assert new["train_rule"] == "residual_energy" and new["train_rank_cap"] == 3
        assert 1 <= new["train_rank"] <= 3 and not new["frozen"]
        assert 0 < new["train_residual_energy_kept"] <= 1


def test_lance_residual_rule_freezes_a_fully_protected_layer():
    bm = digits_benchmark(2)
    model = make_model(2)
    plugin = LanceCLPlugin(eps=0.9, small_layer_dim=0, train_energy=1.0)
    strategy = strategy_with(plugin, model, epochs=1)
    strategy.train(bm.train_stream[0])
    plugin.bases["conv1"] = torch.eye(plugin.bases["conv1"].shape[0])
    w = model.conv1.weight.detach().clone()
    strategy.train(bm.train_stream[1])
    assert plugin.layer_log[1]["layers"]["conv1"]["frozen"]
    torch.testing.assert_close(model.conv1.weight.detach(), w)
    state = copy.deepcopy(plugin.state_dict())
    fresh = LanceCLPlugin()
    fresh.load_state_dict(state)
    assert (fresh.train_energy, fresh.train_max_rank, fresh.train_max_rank_fraction) == (1.0, None, None)


def test_lance_recipe_takes_its_training_rule_from_the_benchmark():
    from lance_cl.strategies import build_strategy

    def plugin_of(defaults):
        return build_strategy("lance", make_model(2), {"lr": 0.1, **defaults}).plugins[0]
    default = plugin_of({})
    assert (default.train_energy, default.train_max_rank, default.train_eps) == (0.9, None, None)
    assert default.train_max_rank_fraction == 0.25 and default.calibration_batches is None
    chosen = plugin_of({"train_energy": 0.8, "train_max_rank_fraction": 0.25})
    assert (chosen.train_energy, chosen.train_max_rank_fraction) == (0.8, 0.25)
    total = plugin_of({"train_eps": 0.97})
    assert (total.train_eps, total.train_energy) == (0.97, None)
    with pytest.raises(ValueError, match="cannot be combined"):
        plugin_of({"train_eps": 0.97, "train_max_rank": 10})
    assert build_strategy("lance_paper", make_model(2), {"lr": 0.1}).plugins[0].train_eps == 0.98
    # the CIFAR protocols calibrate on the first 4 batches of a task (docs/memory.md, section 5)
    from lance_cl.benchmarks.vision import CIFAR10_DEFAULTS, CIFAR100_DEFAULTS

    for defaults in (CIFAR10_DEFAULTS, CIFAR100_DEFAULTS):
        assert plugin_of(defaults).calibration_batches == 4
    # split_digits' tiny layers train in 97 % of the residual energy, uncapped (docs/memory.md,
    # section 6): every rank up to the fan-in is allowed
    from lance_cl.benchmarks.registry import DIGITS_DEFAULTS

    digits = plugin_of(DIGITS_DEFAULTS)
    assert digits.train_energy == 0.97 and [digits.rank_cap(d) for d in (9, 72)] == [9, 72]
    assert digits.small_layer_dim == 0


def test_heads_are_never_protected_whatever_they_are_called():
    import torchvision
    from avalanche.models import MultiHeadClassifier, MTSimpleMLP

    from lance_cl.cl.subspace import head_layer_names, protected_layer_names

    resnet = torchvision.models.resnet18(num_classes=3)
    assert head_layer_names(resnet) == ["fc"]
    assert "fc" not in protected_layer_names(resnet) and "conv1" in protected_layer_names(resnet)
    assert head_layer_names(torchvision.models.mobilenet_v2(num_classes=3)) == ["classifier.1"]
    assert head_layer_names(MTSimpleMLP()) == ["classifier.classifiers.0.classifier"]

    class Body(nn.Module):            # a multi-head classifier under a name no glob knows
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(4, 8)
            self.out = MultiHeadClassifier(8, 2)

    body = Body()
    assert protected_layer_names(body) == ["trunk"]
    # the explicit override: protect the torchvision head too, or name another head
    assert "fc" in protected_layer_names(resnet, heads=[])
    assert "conv1" not in protected_layer_names(resnet, heads=["conv1"])
    plugin = GPMPlugin(heads=[])
    assert "fc" in plugin.protected_names(resnet)


def test_fan_in_grams_are_the_representation_matrices_of_the_unfolded_inputs():
    from lance_cl.cl.plugins.base import forward_batch
    from lance_cl.cl.subspace import collect_fan_in_grams

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Flatten(), nn.Linear(48, 4))
    batches = [[torch.randn(5, 2, 8, 8), torch.zeros(5, dtype=torch.long)] for _ in range(3)]
    rows: dict = {}
    grams = collect_fan_in_grams(model, ["0", "2"], batches, forward_batch, max_samples=12,
                                 rows=rows)
    x = torch.cat([b[0] for b in batches])[:12].double()           # 12 of the 15 samples
    patches = F.unfold(x, 3, padding=1, stride=2)                  # (12, 18, 16)
    conv_ref = torch.einsum("bdl,bel->de", patches, patches)
    hidden = model[0].double()(x).flatten(1)
    model.float()
    assert rows == {"0": 12 * 16, "2": 12}
    assert grams["0"].dtype == grams["2"].dtype == torch.float64
    # float64 products of the float32 activations: exact up to the activations' own rounding
    torch.testing.assert_close(grams["0"], conv_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grams["2"], hidden.t() @ hidden, rtol=1e-6, atol=1e-6)


def test_a_recomputed_conv_keeps_its_input_and_its_update_stays_off_the_protected_span():
    """Nothing of a recomputed layer is stored, so LANCE-CL trains it from its input with the
    gradient projected onto U_F (the core's gradient, the product being linear): conv2, whose
    rank-4 core is smaller than its input, is stored as a core unless it is recomputed; either
    way its task-2 update is orthogonal to its task-1 basis."""
    import lance_cl
    from lance_cl import compact_activations

    bm = digits_benchmark(2)
    for recompute, storage in (((), "core"), (("conv2",), "input")):
        model = make_model(2)
        # compressed first, so that the recomputed module is the one LANCE-CL trains
        lance_cl.compress(model, "lance", layers=protected_names(model), layout="patch")
        compact_activations(model, recompute=recompute)
        plugin = LanceCLPlugin(eps=0.9, small_layer_dim=0, train_max_rank=4)
        strategy = strategy_with(plugin, model, epochs=1)
        strategy.train(bm.train_stream[0])
        basis = plugin.bases["conv2"].double()
        shape = (model.conv2.weight.shape[0], -1)
        before = model.conv2.weight.detach().double().reshape(shape).clone()
        strategy.train(bm.train_stream[1])
        log = plugin.layer_log[1]["layers"]["conv2"]
        assert log["storage"] == storage and log["train_rank"] == 4
        change = model.conv2.weight.detach().double().reshape(shape) - before
        assert change.norm() > 1e-4                                # it trained
        assert (change @ basis).norm() <= 1e-5 * change.norm()     # off the protected span
