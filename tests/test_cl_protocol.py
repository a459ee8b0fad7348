"""GPM protocol pieces: validation split, lr schedule on a plateau, early stop, best weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lance_cl.cl.protocol import GPMSchedulePlugin, split_validation, with_validation
from lance_cl.models import SmallCNN



def _benchmark(n_per_class: int = 24, n_tasks: int = 2):  # type: ignore[no-untyped-def]
    from avalanche.benchmarks import nc_benchmark

    g = torch.Generator().manual_seed(0)
    n_classes = 2 * n_tasks
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    yt = torch.arange(n_classes).repeat_interleave(4)
    xt = torch.randn(len(yt), 1, 8, 8, generator=g) + yt.view(-1, 1, 1, 1).float()
    return nc_benchmark(
        TensorDataset(x, y), TensorDataset(xt, yt), n_experiences=n_tasks, task_labels=True,
        shuffle=False, fixed_class_order=list(range(n_classes)), class_ids_from_zero_in_each_exp=True,
    )


def _model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(1, 2, 2, 8, widths=(4, 8), hidden=16)


class _NoStepSGD(torch.optim.SGD):
    """SGD whose step does nothing: the weights, hence the validation loss, stay flat."""

    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        return None


class _Probe:
    """Counts epochs and keeps a copy of the weights after each one (runs after the schedule)."""

    def __init__(self) -> None:
        from avalanche.core import SupervisedPlugin

        outer = self

        class P(SupervisedPlugin):
            def after_training_epoch(self, strategy, **kwargs):  # type: ignore[no-untyped-def]
                outer.snapshots.append({k: v.clone() for k, v in strategy.model.state_dict().items()})

        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.plugin = P()


def _strategy(model, optimizer, plugins, epochs):  # type: ignore[no-untyped-def]
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(loggers=[])
    return Naive(
        model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=16,
        train_epochs=epochs, eval_mb_size=64, device="cpu", plugins=plugins, evaluator=evaluator,
    )


def test_split_validation_sizes_disjoint_deterministic() -> None:
    bm = _benchmark(n_per_class=50)
    ds = bm.train_stream[0].dataset  # 100 samples
    rng = torch.get_rng_state()
    tr, va = split_validation(ds, 0.05, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # private generator only
    assert (len(tr), len(va)) == (95, 5)
    xs_tr = {tuple(tr[i][0].flatten().tolist()) for i in range(len(tr))}
    xs_va = {tuple(va[i][0].flatten().tolist()) for i in range(len(va))}
    xs_all = {tuple(ds[i][0].flatten().tolist()) for i in range(len(ds))}
    assert xs_tr.isdisjoint(xs_va) and xs_tr | xs_va == xs_all
    tr2, va2 = split_validation(ds, 0.05, seed=3)
    assert all(torch.equal(va[i][0], va2[i][0]) for i in range(5))
    _, va3 = split_validation(ds, 0.05, seed=4)
    assert {tuple(va3[i][0].flatten().tolist()) for i in range(5)} != xs_va
    assert va[0][2] == 0  # task label kept


def test_with_validation_keeps_task_labels_and_sizes() -> None:
    bm, vals = with_validation(_benchmark(n_per_class=50), 0.1, seed=0)
    assert [len(e.dataset) for e in bm.train_stream] == [90, 90]
    assert [len(v) for v in vals] == [10, 10]
    assert [e.task_label for e in bm.train_stream] == [0, 1]
    assert [len(e.dataset) for e in bm.test_stream] == [8, 8]
    assert sorted({int(vals[1][i][1]) for i in range(10)}) <= [0, 1]
    assert {int(vals[1][i][2]) for i in range(10)} == {1}


def test_lr_halved_at_expected_epochs_and_stop_below_lr_min() -> None:
    bm, vals = with_validation(_benchmark(), 0.1, seed=0)
    model = _model()
    opt = _NoStepSGD(model.parameters(), lr=123.0)
    # flat validation loss: epoch 1 improves (from +inf), epochs 2, 3 do not -> lr 1 -> 0.5 after
    # epoch 3; epochs 4, 5 do not -> 0.25 < lr_min = 0.3 -> stop after 5 of the 50 epochs.
    sched = GPMSchedulePlugin(vals, lr=1.0, lr_factor=2.0, patience=2, lr_min=0.3, eval_mb_size=7)
    probe = _Probe()
    strategy = _strategy(model, opt, [sched, probe.plugin], epochs=50)
    strategy.train(bm.train_stream[0], eval_streams=[])
    hist = sched.history[0]
    assert [h["lr"] for h in hist] == [1.0, 1.0, 1.0, 0.5, 0.5]
    assert [h["improved"] for h in hist] == [True, False, False, False, False]
    assert len(probe.snapshots) == 5
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    assert len({h["val_loss"] for h in hist}) == 1
    # next task: lr reset to 1.0 at its start, same schedule again
    strategy.train(bm.train_stream[1], eval_streams=[])
    assert [h["lr"] for h in sched.history[1]] == [1.0, 1.0, 1.0, 0.5, 0.5]
    assert len(probe.snapshots) == 10


def test_patience_counts_non_improving_epochs_only() -> None:
    bm, vals = with_validation(_benchmark(), 0.1, seed=0)
    model = _model()
    # patience 3, factor 4: lr 0.8 for epochs 1-4, 0.2 for 5-7, 0.05 < 0.1 -> stop after 7
    sched = GPMSchedulePlugin(vals, lr=0.8, lr_factor=4.0, patience=3, lr_min=0.1)
    strategy = _strategy(model, _NoStepSGD(model.parameters(), lr=0.8), [sched], epochs=20)
    strategy.train(bm.train_stream[0], eval_streams=[])
    assert [h["lr"] for h in sched.history[0]] == [0.8] * 4 + [0.2] * 3


def test_best_validation_weights_restored() -> None:
    bm, vals = with_validation(_benchmark(), 0.1, seed=0)
    # validation labels flipped: learning the task *raises* the validation loss, so the best
    # epoch is an early one and the last epoch's weights must be thrown away
    flipped = []
    for v in vals:
        xs = torch.stack([v[i][0] for i in range(len(v))])
        ys = torch.tensor([1 - int(v[i][1]) for i in range(len(v))])
        ts = torch.tensor([int(v[i][2]) for i in range(len(v))])
        flipped.append(TensorDataset(xs, ys, ts))
    model = _model()
    sched = GPMSchedulePlugin(flipped, lr=0.1, patience=10, lr_min=1e-5)
    probe = _Probe()
    strategy = _strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [sched, probe.plugin], epochs=4)
    strategy.train(bm.train_stream[0], eval_streams=[])
    hist = sched.history[0]
    assert len(hist) == len(probe.snapshots) == 4
    losses = [h["val_loss"] for h in hist]
    best = min(range(4), key=lambda e: losses[e])
    assert sched.best_epoch[0] == best + 1
    assert best < 3
    final = model.state_dict()
    assert all(torch.equal(final[k], probe.snapshots[best][k]) for k in final)
    assert not all(torch.equal(final[k], probe.snapshots[3][k]) for k in final)


def test_mixed_loader_mixes_class_sorted_data_deterministically():
    from torch.utils.data import TensorDataset

    from lance_cl.cl.protocol import mixed_loader

    y = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    data = TensorDataset(torch.arange(200).float(), y)          # grouped by class, as benchmarks
    first = next(iter(mixed_loader(data, 50)))
    assert 10 < int(first[1].sum()) < 40                       # both classes in the first batch
    again = next(iter(mixed_loader(data, 50)))
    assert torch.equal(first[0], again[0])                     # same order every time
    seen = torch.cat([b[0] for b in mixed_loader(data, 64)])
    assert torch.equal(seen.sort().values, torch.arange(200).float())   # every sample once
