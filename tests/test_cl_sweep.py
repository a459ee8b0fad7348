"""`lance-cl run --jobs 2` on a local Ray instance (2 CPUs): the same run files as sequential runs,
a killed worker's run resumed from its checkpoint, a failing run listed while the others finish,
every name checked before anything trains, and a clear message without Ray.

One Ray sweep (module fixture) serves the first three tests: on a shared 2-core machine a Ray
start and two cold workers cost ~30 s, the 6 runs (3 epochs of 5 tasks) a few seconds each.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from lance_cl.cl import sweep
from lance_cl.cl.commands import add_run_parser, cmd_run

from cl_stubs import install

# lance raises at build time with train_energy=5 (outside (0, 1]); naive and gpm ignore it
COMMON = ["--quick", "--epochs", "1", "--seeds", "0,1", "--no-progress", "--set", "train_energy=5"]
KILLED = "split_digits__gpm__seed1"
KILLED_AFTER = 2


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["run", *argv])


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cmd_run(_parse(argv))
    return status, out.getvalue(), err.getvalue()


def _without_timings(value: Any) -> Any:
    """The run dict less what differs between two identical runs: seconds and versions."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items()
                if not k.endswith("time_s") and not k.startswith("versions")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two JSON-like values differ (for a readable assertion message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in (_differences(a.get(k), b.get(k), f"{path}/{k}") if k in a and k in b
                          else [f"{path}/{k}: only on one side"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in _differences(u, v, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("ray")
    base = tmp_path_factory.mktemp("sweep")
    sequential = _run(["--strategies", "naive,gpm", "--out", str(base / "seq"), *COMMON])
    marker = base / "killed.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(sweep.FAULT_ENV, f"{KILLED}:{KILLED_AFTER}:{marker}")
        mp.delenv("RAY_ADDRESS", raising=False)
        on_ray = _run(["--strategies", "naive,gpm,lance", "--jobs", "2", "--out", str(base / "ray"), *COMMON])
    return {"base": base, "sequential": sequential, "ray": on_ray, "marker": marker}


def test_sweep_on_ray_writes_the_run_files_of_sequential_runs(sweeps: dict[str, Any]) -> None:
    assert sweeps["sequential"][0] == 0
    seq_dir, ray_dir = sweeps["base"] / "seq", sweeps["base"] / "ray"
    names = sorted(p.name for p in seq_dir.glob("*.json"))
    assert names == sorted(f"split_digits__{s}__seed{k}.json" for s in ("naive", "gpm") for k in (0, 1))
    for name in names:
        seq, par = _load(seq_dir / name), _load(ray_dir / name)
        assert par["status"] == "complete" and len(par["accuracy_matrix"]) == 5
        # accuracy matrices, memory figures, config: all of it, bar the seconds
        assert _without_timings(par) == _without_timings(seq), \
            (name, _differences(_without_timings(par), _without_timings(seq))[:10])
    status, printed, _ = sweeps["ray"]
    for strategy in ("naive", "gpm"):   # the same table rows as `lance-cl report`
        assert f"| split_digits | {strategy} | 2 |" in printed
    assert "| split_digits | lance |" not in printed


def test_killed_worker_is_retried_and_resumes_from_its_checkpoint(sweeps: dict[str, Any]) -> None:
    marker = sweeps["marker"]
    assert marker.is_file(), "the fault was not injected"
    before_kill = json.loads(marker.read_text())["train_time_s"]
    assert len(before_kill) == KILLED_AFTER
    final = _load(sweeps["base"] / "ray" / f"{KILLED}.json")
    assert final["status"] == "complete" and final["completed_tasks"] == 5
    assert len(final["accuracy_matrix"]) == 5 and len(final["per_task"]) == 5   # nothing twice
    # the first tasks were not trained again: their recorded seconds are those of the killed attempt
    assert [t["train_time_s"] for t in final["per_task"][:KILLED_AFTER]] == before_kill
    # ... and the resumed run is the uninterrupted run
    assert _without_timings(final) == _without_timings(_load(sweeps["base"] / "seq" / f"{KILLED}.json"))


def test_failing_run_is_listed_and_the_others_finish(sweeps: dict[str, Any]) -> None:
    status, printed, errors = sweeps["ray"]
    assert status == 1
    assert "4 run(s) complete" in printed
    listed = errors.split("failed:\n", 1)[1].splitlines()
    assert [line.split(":")[0].strip() for line in listed] == ["lance seed 0", "lance seed 1"]
    assert all("ValueError: train_energy=5 is outside (0, 1]" in line for line in listed)
    for seed in (0, 1):   # the driver wrote the failed runs' files too
        failed = _load(sweeps["base"] / "ray" / f"split_digits__lance__seed{seed}.json")
        assert failed["status"] == "failed" and "train_energy=5" in failed["error"]
    # one line per finished run, in the order they finished
    finished = [line for line in errors.splitlines() if line.startswith("[")]
    assert len(finished) == 6 and finished[-1].startswith("[6/6]")


def test_names_are_checked_before_anything_runs(tmp_path: Path) -> None:
    out = tmp_path / "never"
    status, _, errors = _run(["--strategies", "naive,foo", "--jobs", "2", "--out", str(out)])
    assert status == 2 and "unknown strategy 'foo'" in errors
    status, _, errors = _run(["--benchmark", "split_digits,nope", "--jobs", "2", "--out", str(out)])
    assert status == 2 and "unknown benchmark 'nope'" in errors
    status, _, errors = _run(["--gpus-per-run", "0.5", "--jobs", "2", "--out", str(out)])
    assert status == 2 and "--device cuda" in errors
    assert not out.exists()


def test_without_ray_parallel_runs_say_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` raises ImportError
    with pytest.raises(sweep.RayUnavailableError, match=r'pip install "lance-cl\[ray\]"'):
        sweep.import_ray()
    status, _, errors = _run(["--strategies", "naive", "--jobs", "2", "--out", str(tmp_path / "r")])
    assert status == 2 and 'pip install "lance-cl[ray]"' in errors
    assert not (tmp_path / "r").exists()


def test_jobs_1_runs_in_this_process_without_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch)   # stub strategies: they exist in this process only, so no Ray worker runs
    monkeypatch.setitem(sys.modules, "ray", None)
    status, printed, _ = _run(["--benchmark", "split-digits", "--strategies", "naive", "--seeds", "0",
                               "--quick", "--epochs", "1", "--no-progress", "--out", str(tmp_path)])
    assert status == 0 and "| split_digits | naive | 1 |" in printed
    assert _load(tmp_path / "split_digits__naive__seed0.json")["status"] == "complete"


def test_run_parser_sweep_options() -> None:
    args = _parse([])
    assert (args.jobs, args.ray_address, args.gpus_per_run) == (None, None, 0.0)
    args = _parse(["--benchmark", "split_digits,split_mnist", "--jobs", "4", "--ray-address", "auto",
                   "--gpus-per-run", "0.25"])
    assert (args.benchmark, args.jobs, args.ray_address, args.gpus_per_run) == (
        "split_digits,split_mnist", 4, "auto", 0.25)
    assert _parse(["--gpus-per-run", "2"]).gpus_per_run == 2.0
    for bad in (["--jobs", "0"], ["--jobs", "two"], ["--gpus-per-run", "1.5"], ["--gpus-per-run", "-1"]):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            _parse(bad)


def test_sweep_runs_order_and_argument_checks() -> None:
    runs = sweep.sweep_runs(["a", "b"], ["x", "y"], [0, 1])
    assert [(r.benchmark, r.strategy, r.seed) for r in runs[:3]] == [("a", "x", 0), ("a", "x", 1), ("a", "y", 0)]
    assert len(runs) == 8 and runs[-1] == sweep.SweepRun("b", "y", 1)
    assert runs[0].stem == "a__x__seed0"
    with pytest.raises(ValueError, match="jobs"):
        sweep.run_sweep(runs, run_options={"out_dir": "x"}, jobs=0)
    with pytest.raises(ValueError, match="gpus_per_run"):
        sweep.run_sweep(runs, run_options={"out_dir": "x"}, gpus_per_run=1.5)


def test_start_over_deletes_the_runs_files_only(tmp_path: Path) -> None:
    from lance_cl.cl.runner import checkpoint_path, result_path

    ours, other = sweep.SweepRun("split_digits", "gpm", 0), sweep.SweepRun("split_digits", "gpm", 1)
    ckpt = checkpoint_path(tmp_path, "split_digits", "gpm", 0)
    ckpt.parent.mkdir(parents=True)
    files = [result_path(tmp_path, "split_digits", "gpm", 0), ckpt, ckpt.with_name(ckpt.name + ".prev")]
    kept = [ckpt.with_name(ckpt.name + ".corrupt"), result_path(tmp_path, "split_digits", "gpm", 1),
            checkpoint_path(tmp_path, "split_digits", "gpm", 1)]
    for path in files + kept:
        path.write_text("x")
    assert sorted(sweep.start_over(tmp_path, [ours])) == sorted(files)
    assert not any(p.exists() for p in files) and all(p.exists() for p in kept)
    assert sweep.start_over(tmp_path, [ours, other][:1]) == []


def test_local_cores() -> None:
    import os

    n = sweep.local_cores()
    assert 1 <= n <= (os.cpu_count() or n)


def test_paths_reach_workers_as_the_driver_means_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert sweep.anchored("runs") == str(tmp_path.resolve() / "runs")
    assert sweep.anchored("/data/x") == "/data/x" and sweep.anchored("~/data") == "~/data"


def test_the_command_leaves_no_ray_instance_behind(sweeps: dict[str, Any]) -> None:
    import ray

    assert sweeps["ray"][0] == 1           # the sweep ran (two lance runs failed on purpose)
    assert not ray.is_initialized()        # the instance the command started is shut down


def test_warm_up_imports_what_a_run_imports() -> None:
    import os
    import subprocess

    # in a fresh interpreter: importing the sweep module loads neither the runner nor Avalanche,
    # and the warm-up task's body loads both (and returns its process id)
    code = ("import os, sys\n"
            "from lance_cl.cl import sweep\n"
            "before = ('avalanche' in sys.modules, 'lance_cl.cl.runner' in sys.modules)\n"
            "pid = sweep._warm_up()\n"
            "print(before, ('avalanche' in sys.modules, 'lance_cl.cl.runner' in sys.modules), "
            "pid == os.getpid())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(False,", "False)", "(True,", "True)", "True"]
    assert sweep._warm_up() == os.getpid()
    assert "lance_cl.cl.runner" in sys.modules and "avalanche" in sys.modules


def test_a_local_sweep_checks_on_a_worker_and_the_driver_imports_neither_avalanche_nor_torch(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    import subprocess

    code = ("import sys\n"
            "from lance_cl.cli import main\n"
            f"status = main(['run', '--strategies', 'naive,foo', '--jobs', '2', '--out', {str(tmp_path / 'r')!r}])\n"
            "print('AVALANCHE', 'avalanche' in sys.modules, 'TORCH', 'torch' in sys.modules)\n"
            "sys.exit(status)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "unknown strategy 'foo'" in done.stderr       # the worker's check, reported here
    assert "AVALANCHE False TORCH False" in done.stdout   # the parser and the checks need neither
    assert not (tmp_path / "r").exists()
