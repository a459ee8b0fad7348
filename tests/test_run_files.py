"""Run files under faults: durable writes, a damaged checkpoint or JSON after k finished tasks,
every name checked before training, progress lines in logs."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lance_cl.cl import run_files
from lance_cl.cl.run_files import (RunFileError, RunFileWarning, load_checkpoint, previous_checkpoint_path,
                                   read_result, save_checkpoint, write_json_atomic)
from lance_cl.cl.runner import check_experiments, checkpoint_path, result_path, run_experiment
from lance_cl.progress import progress_bar

from cl_stubs import install

KW = dict(epochs=2, quick=True, progress=False)
K = 3   # tasks finished before the fault


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        install(mp)
        return run_experiment("split_digits", "naive", 0, out_dir=tmp_path_factory.mktemp("full"), **KW)


def _assert_same_run(resumed: dict, full: dict) -> None:
    assert resumed["status"] == "complete" and resumed["completed_tasks"] == 5
    np.testing.assert_array_equal(np.array(resumed["accuracy_matrix"]), np.array(full["accuracy_matrix"]))
    assert [t["val_history"] for t in resumed["per_task"]] == [t["val_history"] for t in full["per_task"]]
    assert resumed["memory"]["persistent_bytes"] == full["memory"]["persistent_bytes"]


def test_truncated_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch, uninterrupted) -> None:  # type: ignore[no-untyped-def]
    calls = install(monkeypatch)
    run_experiment("split_digits", "naive", 0, out_dir=tmp_path, max_tasks=K, **KW)
    ckpt = checkpoint_path(tmp_path, "split_digits", "naive", 0)
    assert torch.load(previous_checkpoint_path(ckpt), weights_only=False)["completed_tasks"] == K - 1
    _truncate(ckpt)
    calls.train_calls = 0
    with pytest.warns(RunFileWarning, match=f"checkpoint {ckpt} is unreadable.*resuming from .*prev"):
        resumed = run_experiment("split_digits", "naive", 0, out_dir=tmp_path, **KW)
    assert calls.train_calls == 5 - (K - 1)   # the task after the previous checkpoint is trained again
    _assert_same_run(resumed, uninterrupted)
    assert ckpt.with_name(ckpt.name + ".corrupt").is_file()
    assert torch.load(previous_checkpoint_path(ckpt), weights_only=False)["completed_tasks"] == 4
    assert json.loads(result_path(tmp_path, "split_digits", "naive", 0).read_text())["status"] == "complete"


def test_truncated_json_is_rebuilt_from_the_checkpoint(tmp_path, monkeypatch, uninterrupted) -> None:  # type: ignore[no-untyped-def]
    calls = install(monkeypatch)
    run_experiment("split_digits", "naive", 0, out_dir=tmp_path, max_tasks=K, **KW)
    json_file = result_path(tmp_path, "split_digits", "naive", 0)
    _truncate(json_file)
    calls.train_calls = 0
    with pytest.warns(RunFileWarning, match=f"run file {json_file} is unreadable"):
        resumed = run_experiment("split_digits", "naive", 0, out_dir=tmp_path, **KW)
    assert calls.train_calls == 5 - K
    _assert_same_run(resumed, uninterrupted)
    _assert_same_run(json.loads(json_file.read_text()), uninterrupted)


def test_no_readable_checkpoint_is_an_error_that_keeps_the_finished_tasks(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = install(monkeypatch)
    run_experiment("split_digits", "naive", 0, out_dir=tmp_path, max_tasks=K, **KW)
    json_file = result_path(tmp_path, "split_digits", "naive", 0)
    ckpt = checkpoint_path(tmp_path, "split_digits", "naive", 0)
    before = json_file.read_bytes()
    _truncate(ckpt)
    _truncate(previous_checkpoint_path(ckpt))
    damaged = {p: p.read_bytes() for p in (ckpt, previous_checkpoint_path(ckpt))}
    calls.train_calls = 0
    with pytest.raises(RunFileError, match=f"{ckpt}.*{ckpt}.prev.*delete the damaged"):
        run_experiment("split_digits", "naive", 0, out_dir=tmp_path, **KW)
    assert calls.train_calls == 0 and calls.built == 1   # nothing built or trained on resume
    assert json_file.read_bytes() == before              # K finished tasks, untouched
    assert json.loads(before)["completed_tasks"] == K
    assert {p: p.read_bytes() for p in damaged} == damaged


def test_a_crash_while_resuming_keeps_the_restored_tasks(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = install(monkeypatch)
    run_experiment("split_digits", "naive", 0, out_dir=tmp_path, max_tasks=K, **KW)
    calls.fail_at = K
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment("split_digits", "naive", 0, out_dir=tmp_path, **KW)
    failed = json.loads(result_path(tmp_path, "split_digits", "naive", 0).read_text())
    assert failed["status"] == "failed" and failed["completed_tasks"] == K
    assert len(failed["accuracy_matrix"]) == K


def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    events: list[tuple[str, str, str]] = []   # ("fsync", path, "") or ("replace", source, target)
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        real_fsync(fd)

    def replace(src, dst) -> None:  # type: ignore[no-untyped-def]
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(run_files.os, "fsync", fsync)
    monkeypatch.setattr(run_files.os, "replace", replace)
    write_json_atomic(tmp_path / "r.json", {"x": float("nan"), "y": np.float32(1.5)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": None, "y": 1.5}
    save_checkpoint(tmp_path / "c.pt", {"n": 1})
    save_checkpoint(tmp_path / "c.pt", {"n": 2})
    assert torch.load(tmp_path / "c.pt", weights_only=False) == {"n": 2}
    assert torch.load(previous_checkpoint_path(tmp_path / "c.pt"), weights_only=False) == {"n": 1}
    for target in (str(tmp_path / "r.json"), str(tmp_path / "c.pt")):
        i = max(j for j, (kind, _, t) in enumerate(events) if kind == "replace" and t == target)
        source = events[i][1]
        assert ("fsync", source, "") in events[:i], f"{source} renamed onto {target} before fsync"
        assert ("fsync", str(tmp_path), "") in events[i:]   # the folder, after the rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.prev", "r.json"]   # no temporaries


def test_read_result_and_load_checkpoint_on_missing_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert read_result(tmp_path / "none.json") is None
    assert load_checkpoint(tmp_path / "none.pt", {}) is None
    # a .prev without its checkpoint is from a run started over: not resumed from
    save_checkpoint(tmp_path / "c.pt", {"config": {"seed": 0}, "completed_tasks": 1, "model": {}, "results": {}})
    save_checkpoint(tmp_path / "c.pt", {"config": {"seed": 0}, "completed_tasks": 2, "model": {}, "results": {}})
    (tmp_path / "c.pt").unlink()
    assert load_checkpoint(tmp_path / "c.pt", {"seed": 0}) is None
    # another config's checkpoint is not used
    save_checkpoint(tmp_path / "d.pt", {"config": {"seed": 1}, "completed_tasks": 1, "model": {}, "results": {}})
    assert load_checkpoint(tmp_path / "d.pt", {"seed": 0}) is None


def test_every_name_is_checked_before_anything_trains(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lance_cl.data import DatasetNotFoundError

    check_experiments("split_digits", ["lance", "gpm+compact"])
    with pytest.raises(ValueError, match="unknown strategy 'foo'; choose from .*lance"):
        check_experiments("split_digits", ["lance", "foo"])
    with pytest.raises(KeyError, match="unknown benchmark 'nope'"):
        check_experiments("nope", ["lance"])
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
        check_experiments("split_mnist", ["lance"], data_root=tmp_path)


def test_progress_in_a_log_is_whole_lines() -> None:
    log = io.StringIO()
    with progress_bar(total=500, desc="steps", file=log) as bar:
        for _ in range(500):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert 1 <= len(lines) <= 2   # the first state and the last, not one per step
    assert "500/500" in lines[-1] and lines[-1].startswith("steps")
    quiet = io.StringIO()
    for _ in progress_bar(range(3), file=quiet, disable=True):
        pass
    assert quiet.getvalue() == ""


def test_json_safe_gives_plain_python() -> None:
    got = run_files.json_safe({"t": torch.tensor([1.0, float("inf")]), "n": np.float32(0.5),
                               3: (Path("a"),), "v": torch.__version__, "i": np.int64(7)})
    assert got == {"t": [1.0, None], "n": 0.5, "3": ["a"], "v": str(torch.__version__), "i": 7}
    # torch.__version__ is a str subclass defined by torch: plain str, so that unpickling the
    # value needs no torch (a sweep's driver receives run JSONs this way)
    assert type(got["v"]) is str and type(got["n"]) is float and type(got["i"]) is int
