"""The protected bases describe the weights a task ends with, whatever the plugin order; frozen
layers give exact input gradients and save nothing of their input.

Task 1's inputs lie in a 6-dim subspace S of R^20 and the body is fc1 -> fc2 (no non-linearity in
between), so fc2's task-1 inputs W1 x + b1 lie in a 7-dim span that depends on the task-1
weights. The validation set of task 1 has flipped labels, so its best epoch is the first and
GPMSchedulePlugin restores the epoch-1 weights at the end of the task: a basis grown before that
restore would describe a discarded network, and task 2 would move task 1's outputs.
"""
from __future__ import annotations

import itertools
import warnings
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from avalanche.benchmarks import nc_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lance_cl.cl.plugins import GPMPlugin, LanceCLPlugin, SGPPlugin, TRGPPlugin
from lance_cl.cl.protocol import GPMSchedulePlugin
from lance_cl.core.frozen import frozen_conv2d, frozen_linear
from lance_cl.models.heads import MultiHeadModule

D_IN, D_SPAN, N = 20, 6, 96


class TwoLayerBody(MultiHeadModule):
    """fc1 (20 -> 16) -> fc2 (16 -> 12) -> ReLU -> one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, 16)
        self.fc2 = nn.Linear(16, 12)
        self._make_heads(12, 2, 2)

    def features(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc2(self.fc1(x)))


def _span() -> Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.linalg.qr(torch.randn(D_IN, D_SPAN, generator=g))[0]      # (20, 6) orthonormal


def _data():
    """Task 1 (classes 0, 1): inputs in span(A); task 2 (classes 2, 3): inputs in all of R^20.
    Returns (benchmark, validation sets with task 1's labels flipped, A)."""
    g = torch.Generator().manual_seed(0)
    a = _span()
    z = torch.randn(N, D_SPAN, generator=g)
    x1, y1 = z @ a.t(), (z[:, 0] > 0).long()
    x2 = torch.randn(N, D_IN, generator=g)
    y2 = 2 + (x2[:, :3].sum(1) > 0).long()
    x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
    bm = nc_benchmark(TensorDataset(x, y), TensorDataset(x, y), n_experiences=2, task_labels=True,
                      shuffle=False, fixed_class_order=[0, 1, 2, 3],
                      class_ids_from_zero_in_each_exp=True)
    zv = torch.randn(32, D_SPAN, generator=g)
    val1 = TensorDataset(zv @ a.t(), (zv[:, 0] <= 0).long())         # flipped: epoch 1 is best
    xv2 = torch.randn(32, D_IN, generator=g)
    val2 = TensorDataset(xv2, (xv2[:, :3].sum(1) > 0).long())
    return bm, [val1, val2], a


def _plugin(cls):
    options = dict(eps=0.9999, eps_step=0.0, basis_samples=10 * N)
    if cls is SGPPlugin:
        # every importance rounds to 1 in float32: SGP must then protect the whole span exactly
        options["alpha"] = 1e12
    return cls(**options)


def _strategy(subspace, schedule, order: str, epochs: int = 4):
    torch.manual_seed(0)
    model = TwoLayerBody()
    plugins = [subspace, schedule] if order == "subspace_first" else [schedule, subspace]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(loggers=[])
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
                 criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=epochs,
                 eval_mb_size=64, plugins=plugins, evaluator=evaluator)


@torch.no_grad()
def _task1_outputs(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    out = model(x, 0).double()
    model.train()
    return out


class _WeightsAtEpoch(SupervisedPlugin):
    """Copy of the model's parameters after every epoch of experience 0."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshots: list[dict[str, Tensor]] = []

    def after_training_epoch(self, strategy, *args, **kwargs):
        if strategy.experience.current_experience == 0:
            self.snapshots.append({k: v.detach().clone() for k, v in strategy.model.state_dict().items()})


def _inputs_in_span(a: Tensor) -> Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(40, D_SPAN, generator=g) @ a.t()


@pytest.mark.parametrize("order", ["subspace_first", "schedule_first"])
@pytest.mark.parametrize("cls", [GPMPlugin, SGPPlugin, LanceCLPlugin, TRGPPlugin])
def test_task1_outputs_survive_task2_when_best_weights_are_restored(cls, order):
    bm, vals, a = _data()
    subspace = _plugin(cls)
    schedule = GPMSchedulePlugin(vals, lr=0.2, patience=50)
    probe = _WeightsAtEpoch()
    strategy = _strategy(subspace, schedule, order)
    strategy.plugins.append(probe)
    strategy.train(bm.train_stream[0])
    model = strategy.model
    assert schedule.best_epoch[0] == 1 and len(schedule.history[0]) == 4
    # the restore matters: the last epoch's fc1 differs from the restored (epoch-1) one
    assert (probe.snapshots[-1]["fc1.weight"] - model.fc1.weight).abs().max() > 1e-2
    torch.testing.assert_close(model.fc1.weight.detach(), probe.snapshots[0]["fc1.weight"])
    # fc2's basis spans fc2's task-1 inputs under the restored weights
    x = _inputs_in_span(a)
    with torch.no_grad():
        h = model.fc1(x).double()
    p = subspace.bases["fc2"].double()
    assert p.shape[1] < 16
    assert (h - (h @ p) @ p.t()).norm() < 1e-4 * h.norm()
    before = _task1_outputs(model, x)
    strategy.train(bm.train_stream[1])
    assert (model.fc1.weight.detach() - probe.snapshots[0]["fc1.weight"]).abs().max() > 1e-3
    torch.testing.assert_close(_task1_outputs(model, x), before, rtol=0, atol=2e-5)


@pytest.mark.parametrize("cls", [GPMPlugin, LanceCLPlugin, TRGPPlugin])
def test_two_experiences_in_one_train_call_grow_both_bases(cls):
    bm, vals, a = _data()
    # reference: one train() call per experience
    ref_plugin = _plugin(cls)
    ref = _strategy(ref_plugin, GPMSchedulePlugin(vals, lr=0.2, patience=50), "subspace_first", 2)
    ref.train(bm.train_stream[0])
    ref_bases0 = {n: b.clone() for n, b in ref_plugin.bases.items()}
    ref.train(bm.train_stream[1])

    plugin = _plugin(cls)
    schedule = GPMSchedulePlugin(vals, lr=0.2, patience=50)
    strategy = _strategy(plugin, schedule, "subspace_first", 2)
    strategy.train([bm.train_stream[0], bm.train_stream[1]])
    assert schedule.best_epoch[0] == 1
    assert plugin.tasks_trained == 2 and [e["task"] for e in plugin.layer_log] == [0, 1]
    assert plugin.layer_log == ref_plugin.layer_log
    for name, basis in ref_plugin.bases.items():
        k0 = ref_bases0[name].shape[1]
        assert 0 < k0 < basis.shape[1] or k0 == basis.shape[1] == basis.shape[0]
        torch.testing.assert_close(plugin.bases[name], basis, rtol=0, atol=1e-5)
    # task 1 is protected in the one-call run too
    x = _inputs_in_span(a)
    torch.testing.assert_close(_task1_outputs(strategy.model, x), _task1_outputs(ref.model, x),
                               rtol=0, atol=2e-5)


def test_state_dict_refuses_a_pending_basis():
    bm, vals, _ = _data()
    plugin = _plugin(GPMPlugin)
    strategy = _strategy(plugin, GPMSchedulePlugin(vals, lr=0.2, patience=50), "subspace_first", 1)
    seen = {}

    class Checkpoint(SupervisedPlugin):
        def after_training_exp(self, strategy, *args, **kwargs):
            with pytest.raises(RuntimeError, match="after_training"):
                plugin.state_dict()
            seen["checked"] = True
    strategy.plugins.append(Checkpoint())
    strategy.train(bm.train_stream[0])
    assert seen["checked"] and plugin.state_dict()["tasks_trained"] == 1


# -- frozen layers ----------------------------------------------------------------------------
def _grads(fn, x: Tensor, bias: Optional[Tensor], g: Tensor) -> tuple[Tensor, ...]:
    """(output, grad_x[, grad_bias]) of fn(x, bias) for the output gradient g."""
    out = fn(x, bias)
    return (out, *torch.autograd.grad(out, [x] + ([bias] if bias is not None else []), g))


def test_frozen_conv2d_matches_autograd_over_strides_paddings_dilations_groups():
    gen = torch.Generator().manual_seed(0)
    cases = itertools.product([1, 2], [0, 1, (2, 1), "same", "valid"], [1, (2, 1)],
                              [(1, 8), (2, 4), (4, 8)], [True, False])      # (4, 8): depthwise
    checked = 0
    for stride, padding, dilation, (groups, c_out), with_bias in cases:
        if padding == "same" and stride != 1:
            continue
        x = torch.randn(2, 4, 7, 6, dtype=torch.float64, generator=gen, requires_grad=True)
        w = torch.randn(c_out, 4 // groups, 3, 2, dtype=torch.float64, generator=gen)
        b = torch.randn(c_out, dtype=torch.float64, generator=gen, requires_grad=True) if with_bias else None
        with torch.no_grad():
            shape = F.conv2d(x, w, b, stride, padding, dilation, groups).shape
        g = torch.randn(shape, dtype=torch.float64, generator=gen)
        ours = _grads(lambda x, b: frozen_conv2d(x, w, b, stride, padding, dilation, groups), x, b, g)
        ref = _grads(lambda x, b: F.conv2d(x, w, b, stride, padding, dilation, groups), x, b, g)
        for a, r in zip(ours, ref):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12,
                                       msg=f"stride={stride} padding={padding} dilation={dilation} "
                                           f"groups={groups}")
        checked += 1
    assert checked == 2 * 5 * 2 * 3 * 2 - 2 * 3 * 2     # every valid combination ran
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=gen)        # depthwise
    assert torch.autograd.gradcheck(lambda x, b: frozen_conv2d(x, w, b, 2, 1, 1, 2), (x, b))
    x3 = x[0].detach().requires_grad_()                                     # unbatched input
    assert torch.autograd.gradcheck(lambda x: frozen_conv2d(x, w, None, 1, "same", 2, 2), (x3,))


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_frozen_linear_matches_autograd_for_any_leading_dims(lead, with_bias):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    b = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True) if with_bias else None
    g = torch.randn(*lead, 4, dtype=torch.float64, generator=gen)
    ours = _grads(lambda x, b: frozen_linear(x, w, b), x, b, g)
    ref = _grads(lambda x, b: F.linear(x, w, b), x, b, g)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: frozen_linear(x, w, b.detach() if b is not None else None), (x,))


def _saved_numels(fn) -> list[int]:
    saved: list[int] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return saved


def test_frozen_layers_save_nothing_of_the_input_size():
    x = torch.randn(4, 4, 16, 16, requires_grad=True)                       # 4096 entries
    w = torch.randn(8, 4, 3, 3)                                             # 288
    b = torch.zeros(8, requires_grad=True)
    assert x.numel() in _saved_numels(lambda: F.conv2d(x, w, b, 1, 1))      # what PyTorch keeps
    for fn in (lambda: frozen_conv2d(x, w, b, 2, 1), lambda: frozen_conv2d(x, w, None, 1, "same"),
               lambda: frozen_conv2d(x, w[:, :1], b, 1, 1, 2, 4)):
        assert all(n < x.numel() for n in _saved_numels(fn))
    xl, wl = torch.randn(4, 16, 20, requires_grad=True), torch.randn(8, 20)
    assert _saved_numels(lambda: frozen_linear(xl, wl, b)) == [wl.numel()]


def test_frozen_helpers_refuse_trained_weights_and_skip_the_graph_without_grads():
    w = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        frozen_linear(torch.randn(4, 2, requires_grad=True), w)
    with torch.no_grad():
        assert frozen_linear(torch.randn(4, 2), w).grad_fn is None
    assert frozen_conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 1, 1)).grad_fn is None


def test_frozen_helpers_follow_autocast():
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    w = torch.randn(5, 4, 3, 3)
    grads = []
    for conv in (frozen_conv2d, F.conv2d):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x, w, None, 1, 1)
        assert out.dtype == torch.bfloat16
        grads.append(torch.autograd.grad(out.float().sum(), x)[0])
    assert grads[0].dtype == torch.float32
    torch.testing.assert_close(grads[0], grads[1])


def test_compressed_layer_frozen_path_is_exact_and_saves_no_input():
    from lance_cl import wrap
    from lance_cl.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(1, 2, 1, 8, widths=(4, 8), hidden=16)
    reference = SmallCNN(1, 2, 1, 8, widths=(4, 8), hidden=16)
    reference.load_state_dict(model.state_dict())
    wrap.compress(model, "lance", layers=["conv2", "fc1"], layout="patch")
    for m in (model, reference):
        for name in ("conv2", "fc1"):
            m.get_submodule(name).weight.requires_grad_(False)
    x = torch.randn(6, 1, 8, 8)
    conv_in = {}
    model.conv2.register_forward_hook(lambda mod, inp, out: conv_in.update(x=inp[0]))
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, 0)
    assert not any(t.data_ptr() == conv_in["x"].data_ptr() and t.shape == conv_in["x"].shape
                   for t in saved)
    out.sum().backward()
    reference(x, 0).sum().backward()
    assert model.conv2.weight.grad is None and model.fc1.weight.grad is None
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=n)
