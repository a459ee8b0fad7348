"""run_experiment: results JSON, memory figures, failure record and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lance_cl.cl.runner import checkpoint_path, result_path, run_experiment

from cl_stubs import install

KW = dict(epochs=2, quick=True, progress=False)


def test_uninterrupted_vs_crashed_and_resumed_identical(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = install(monkeypatch)
    full = run_experiment("split_digits", "naive", 0, out_dir=tmp_path / "a", **KW)
    assert calls.train_calls == 5
    on_disk = json.loads(result_path(tmp_path / "a", "split_digits", "naive", 0).read_text())
    assert on_disk["status"] == "complete" and on_disk["completed_tasks"] == 5
    R = np.array(full["accuracy_matrix"])
    assert R.shape == (5, 5)
    # ACC / BWT by hand from the stored matrix
    assert full["acc"] == pytest.approx(R[4].mean())
    assert full["bwt"] == pytest.approx(np.mean([R[4, j] - R[j, j] for j in range(4)]))
    assert on_disk["acc"] == pytest.approx(full["acc"])
    for t in full["per_task"]:
        assert 1 <= t["epochs_run"] <= 2 and len(t["val_history"]) == t["epochs_run"]
        m = t["memory"]
        # SmallCNN 8x8 (8, 16 channels), batch 16, float32: conv1 saves x (1x8x8), conv2 its
        # pooled input (8x4x4), fc1 the flattened (16x2x2) map: 4 * 16 * (64 + 128 + 64) bytes;
        # the head's input (32 features) is not counted
        assert m["activation_layers_bytes"] == 4 * 16 * (64 + 128 + 64)
        assert m["activation_batch_size"] == 16
        assert m["activation_total_bytes"] > m["activation_layers_bytes"]
        assert m["persistent_bytes"] == 5 * 2 * 32 * 4  # naive keeps its 5 heads (2 x 32) only
        # peak of the step: everything saved coexists at the end of the forward (less the batch,
        # x 16x1x8x8 float32 and y 16 int64, alive before the step), every gradient at the end of
        # backward: conv1 8x1x3x3, bn1 2x8, conv2 16x8x3x3, bn2 2x16, fc1 32x64, bn3 2x32, head
        assert m["peak_step_bytes"] >= m["activation_total_bytes"] - 4 * 16 * 64 - 8 * 16
        assert m["peak_step_bytes"] >= 4 * (72 + 16 + 1152 + 32 + 2048 + 64 + 2 * 32 + 2)
    assert full["memory"]["peak_step_bytes"] == max(t["memory"]["peak_step_bytes"] for t in full["per_task"])
    assert on_disk["memory"]["peak_step_bytes"] == full["memory"]["peak_step_bytes"]
    assert set(on_disk["versions"]) >= {"lance_cl", "torch", "avalanche", "python"}

    # crash in the third task: results of tasks 0 and 1 stay on disk, status failed
    calls.fail_at, calls.train_calls = 2, 0
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment("split_digits", "naive", 0, out_dir=tmp_path / "b", **KW)
    partial = json.loads(result_path(tmp_path / "b", "split_digits", "naive", 0).read_text())
    assert partial["status"] == "failed" and "simulated crash in task 2" in partial["error"]
    assert partial["completed_tasks"] == 2 and len(partial["accuracy_matrix"]) == 2
    assert checkpoint_path(tmp_path / "b", "split_digits", "naive", 0).is_file()
    np.testing.assert_array_equal(np.array(partial["accuracy_matrix"]), R[:2])

    # resume: only tasks 2, 3, 4 are trained, and the matrix is exactly the uninterrupted one
    calls.fail_at, calls.train_calls = None, 0
    resumed = run_experiment("split_digits", "naive", 0, out_dir=tmp_path / "b", **KW)
    assert calls.train_calls == 3
    assert resumed["status"] == "complete"
    np.testing.assert_array_equal(np.array(resumed["accuracy_matrix"]), R)
    assert [t["val_history"] for t in resumed["per_task"]] == [t["val_history"] for t in full["per_task"]]

    # a complete run is not run again
    built = calls.built
    again = run_experiment("split_digits", "naive", 0, out_dir=tmp_path / "b", **KW)
    assert calls.built == built and again["accuracy_matrix"] == resumed["accuracy_matrix"]


def test_max_tasks_then_resume(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = install(monkeypatch)
    part = run_experiment("split_digits", "naive", 1, out_dir=tmp_path, max_tasks=4, **KW)
    assert part["status"] == "running" and part["completed_tasks"] == 4
    # metrics over the 4 finished tasks: the 4x4 block
    R4 = np.array(part["accuracy_matrix"])[:, :4]
    assert part["acc"] == pytest.approx(R4[3].mean())
    calls.train_calls = 0
    done = run_experiment("split_digits", "naive", 1, out_dir=tmp_path, **KW)
    assert calls.train_calls == 1 and done["status"] == "complete"
    # a different config does not reuse the checkpoint
    calls.train_calls = 0
    run_experiment("split_digits", "naive", 1, out_dir=tmp_path, epochs=1, quick=True, progress=False,
                   max_tasks=1)
    assert calls.train_calls == 1


def test_a_checkpoint_of_another_model_is_refused_strictly(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    install(monkeypatch)
    run_experiment("split_digits", "naive", 0, out_dir=tmp_path, max_tasks=2, **KW)
    ckpt_file = checkpoint_path(tmp_path, "split_digits", "naive", 0)
    ckpt = torch.load(ckpt_file, weights_only=False)
    ckpt["model"]["fc9.weight"] = torch.zeros(1)
    torch.save(ckpt, ckpt_file)
    with pytest.raises(RuntimeError, match="Unexpected key.*fc9.weight"):
        run_experiment("split_digits", "naive", 0, out_dir=tmp_path, **KW)
    failed = json.loads(result_path(tmp_path, "split_digits", "naive", 0).read_text())
    assert failed["status"] == "failed" and failed["completed_tasks"] == 2   # finished tasks kept


def test_a_diverged_task_is_a_failure_with_a_clear_message():
    from lance_cl.cl.runner import _check_finite

    _check_finite(0, [{"epoch": 1, "val_loss": 0.5, "lr": 0.1}], [90.0, 80.0])
    with pytest.raises(FloatingPointError, match="task 2 diverged.*epoch 3 \\(lr 0.05\\)"):
        _check_finite(2, [{"epoch": 2, "val_loss": 0.4, "lr": 0.1},
                          {"epoch": 3, "val_loss": float("nan"), "lr": 0.05}], [90.0])
    with pytest.raises(FloatingPointError, match="task 0 diverged"):
        _check_finite(0, [], [float("nan")])


@pytest.mark.parametrize("strategy", ["lance", "sgp", "ewc", "lwf", "agem", "joint"])
def test_real_plugin_run_resumes_exactly(tmp_path, strategy) -> None:  # type: ignore[no-untyped-def]
    """The real recipes (no stub): stopping after 2 tasks and resuming gives the same accuracy
    matrix, protected bases and memory figures as an uninterrupted run."""
    kw = dict(epochs=1, quick=True, progress=False)
    full = run_experiment("split_digits", strategy, 0, out_dir=tmp_path / "a", **kw)
    run_experiment("split_digits", strategy, 0, out_dir=tmp_path / "b", max_tasks=2, **kw)
    resumed = run_experiment("split_digits", strategy, 0, out_dir=tmp_path / "b", **kw)
    assert resumed["status"] == full["status"] == "complete"
    np.testing.assert_array_equal(np.array(resumed["accuracy_matrix"]),
                                  np.array(full["accuracy_matrix"]))
    for a, b in zip(resumed["per_task"], full["per_task"]):
        assert a["layers"] == b["layers"]
        assert a["memory"]["persistent_bytes"] == b["memory"]["persistent_bytes"]
        assert a["memory"]["activation_layers_bytes"] == b["memory"]["activation_layers_bytes"]


# -- what each method keeps: plugins report it themselves, Avalanche's through adapters ----------


def test_a_plugin_that_reports_itself_needs_no_change_in_the_strategy_layer(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A toy plugin with the reporting methods, registered as a recipe from the test: its bytes,
    diagnostics and state reach the run files, and a resume restores its state."""
    from avalanche.core import SupervisedPlugin

    import lance_cl.strategies as S

    resumed_with: list[int] = []

    class Toy(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[int] = []

        def after_training_exp(self, strategy, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            self.seen.append(int(strategy.experience.current_experience))

        def memory_figures(self, strategy) -> dict:  # type: ignore[no-untyped-def]
            return {"persistent_bytes": 100 * len(self.seen), "training_extra_bytes": 7}

        def task_diagnostics(self, task: int) -> dict:
            return {"toy": {"seen": task in self.seen}}

        def state_dict(self) -> dict:
            return {"seen": list(self.seen)}

        def load_run_state(self, state, strategy, past_datasets=()) -> None:  # type: ignore[no-untyped-def]
            self.seen = list(state["seen"])
            resumed_with.append(len(past_datasets))

    monkeypatch.setitem(S.RECIPES, "toy", S.Recipe("toy", "test plugin", lambda d: [Toy()]))
    kw = dict(epochs=1, quick=True, progress=False)
    run_experiment("split_digits", "toy", 0, out_dir=tmp_path, max_tasks=2, **kw)
    done = run_experiment("split_digits", "toy", 0, out_dir=tmp_path, **kw)
    assert resumed_with == [2]
    heads = 5 * 2 * 32 * 4   # 5 bias-free heads of 2 x 32 float32
    assert [t["memory"]["persistent_bytes"] for t in done["per_task"]] == [heads + 100 * (i + 1) for i in range(5)]
    assert all(t["memory"]["training_extra_bytes"] == 7 for t in done["per_task"])
    assert all(t["layers"] == {"toy": {"seen": True}} for t in done["per_task"])


@pytest.mark.parametrize("name", ["ewc", "lwf", "joint"])
def test_avalanche_methods_report_their_state_through_the_adapters(name: str) -> None:
    import copy

    import lance_cl.strategies as S
    from lance_cl.benchmarks import get_benchmark

    spec = get_benchmark("split_digits", quick=True)
    torch.manual_seed(0)
    strategy = S.build_strategy(name, spec.model_factory(), spec, epochs=1)
    strategy.train(spec.train_stream[0], eval_streams=[])
    model = strategy.model
    heads = 5 * 2 * 32 * 4
    weights = 4 * sum(p.numel() for p in model.parameters())
    task_data = len(spec.train_stream[0].dataset) * 4 * 8 * 8   # 8 x 8 float32 images
    expected = {"ewc": 2 * weights,       # anchor weights and Fisher diagonal, one per parameter
                "lwf": weights,           # the previous model
                "joint": task_data}[name]  # the data of the finished task
    assert S.memory_figures(strategy) == {"persistent_bytes": heads + expected, "training_extra_bytes": 0}
    state = S.strategy_state(strategy)
    fresh = S.build_strategy(name, copy.deepcopy(model), spec, epochs=1)
    S.load_strategy_state(fresh, state, [spec.train_stream[0].dataset])
    assert S.memory_figures(fresh) == S.memory_figures(strategy)


def test_sizes_count_bytes_by_hand() -> None:
    from torch.utils.data import TensorDataset

    from lance_cl.cl.sizes import dataset_bytes, parameter_bytes, tensor_bytes

    class Boxed:   # Avalanche's ParamData keeps its tensor in .data
        data = torch.zeros(3, dtype=torch.float64)

    assert tensor_bytes({"a": torch.zeros(2, 5), "b": [torch.zeros(4, dtype=torch.int8), Boxed()], "c": 1}) == 40 + 4 + 24
    assert dataset_bytes(TensorDataset(torch.zeros(6, 3, 2), torch.zeros(6))) == 6 * 3 * 2 * 4
    assert dataset_bytes(TensorDataset(torch.zeros(0, 3), torch.zeros(0))) == 0
    assert parameter_bytes(torch.nn.Linear(3, 2)) == (3 * 2 + 2) * 4
