"""ResumableAGEMPlugin and the dataset-backed parts of load_strategy_state."""
from __future__ import annotations

import random

import pytest
import torch
from avalanche.training import Cumulative
from avalanche.training.plugins import AGEMPlugin

from lance_cl.benchmarks.registry import benchmark_from_tensors
from lance_cl.cl.plugins import ResumableAGEMPlugin
from lance_cl.models import SmallCNN
from lance_cl.strategies import load_strategy_state, strategy_state


@pytest.fixture(scope="module")
def task_datasets():  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 1, 4, 4, generator=g), torch.arange(120) % 4
    bm, _ = benchmark_from_tensors(x, y, x[:8], y[:8], n_tasks=2, val_fraction=0.0)
    return [exp.dataset for exp in bm.train_stream]


def _batch_fingerprint(plugin: AGEMPlugin) -> torch.Tensor:
    x, y, t = (torch.as_tensor(v) for v in next(plugin.buffer_dliter)[:3])
    return torch.cat([x.flatten(), y.float(), t.float()])


def test_memory_is_a_uniform_subset_of_each_task(task_datasets) -> None:  # type: ignore[no-untyped-def]
    plugin = ResumableAGEMPlugin(patterns_per_experience=10, sample_size=8)
    random.seed(3)
    for ds in task_datasets:
        plugin.update_memory(ds)
    assert [len(b) for b in plugin.buffers] == [10, 10]
    for ds, ix, buf in zip(task_datasets, plugin.memory_indices, plugin.buffers):
        assert len(set(ix)) == 10 and all(0 <= i < len(ds) for i in ix)
        for k, i in enumerate(ix):  # the buffer holds exactly the recorded samples
            torch.testing.assert_close(buf[k][0], ds[i][0], rtol=0, atol=0)
    # a task smaller than the budget is kept whole, in order
    small = ResumableAGEMPlugin(patterns_per_experience=1000, sample_size=8)
    small.update_memory(task_datasets[0])
    assert small.memory_indices == [list(range(len(task_datasets[0])))]


def test_state_round_trip_gives_the_same_memory_and_batches(task_datasets) -> None:  # type: ignore[no-untyped-def]
    random.seed(0)
    torch.manual_seed(0)
    original = ResumableAGEMPlugin(patterns_per_experience=12, sample_size=8)
    for ds in task_datasets:
        original.update_memory(ds)
    state = original.state_dict()

    restored = ResumableAGEMPlugin(patterns_per_experience=12, sample_size=8)
    torch.manual_seed(123)  # the restore must not depend on (or disturb) the global RNG
    before = torch.get_rng_state()
    restored.load_state_dict(state, task_datasets)
    assert torch.equal(torch.get_rng_state(), before)
    assert restored.memory_indices == original.memory_indices
    for _ in range(3):  # same reference batches, drawn under the same global RNG
        torch.manual_seed(7)
        a = _batch_fingerprint(original)
        torch.manual_seed(7)
        b = _batch_fingerprint(restored)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_without_the_task_datasets_is_a_clear_error(task_datasets) -> None:  # type: ignore[no-untyped-def]
    plugin = ResumableAGEMPlugin(patterns_per_experience=5, sample_size=4)
    for ds in task_datasets:
        plugin.update_memory(ds)
    with pytest.raises(ValueError, match="memory for 2 tasks but only 1 task datasets"):
        ResumableAGEMPlugin(5, 4).load_state_dict(plugin.state_dict(), task_datasets[:1])


def test_load_strategy_state_rebuilds_cumulative_data(task_datasets) -> None:  # type: ignore[no-untyped-def]
    model = SmallCNN(1, n_classes=2, n_tasks=2, input_size=4, widths=(2, 2), hidden=4)
    strategy = Cumulative(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          criterion=torch.nn.CrossEntropyLoss(),
                          train_mb_size=4, train_epochs=1)
    load_strategy_state(strategy, strategy_state(strategy), task_datasets)
    assert len(strategy.dataset) == sum(len(d) for d in task_datasets)
    torch.testing.assert_close(strategy.dataset[len(task_datasets[0])][0], task_datasets[1][0][0])
    load_strategy_state(strategy, {}, [])
    assert strategy.dataset is None
