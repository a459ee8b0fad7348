"""Sweeps on Ray: every (benchmark, strategy, seed) run of a comparison as one Ray task.

>>> runs = sweep_runs(["split_digits"], ["lance", "gpm"], [0, 1])
>>> outcome = run_sweep(runs, run_options={"out_dir": "runs"}, jobs=2)
>>> outcome.results, outcome.failures

Each task calls :func:`lance_cl.cl.runner.run_experiment` with resume on, so a task that Ray
retries after its worker (or node) died continues from the run's last checkpoint; runs already
complete are returned as they are. The task returns the run's results dict and the driver writes
it to ``<out>/<run>.json``, so the out directory is complete on the driver's machine with or
without a shared filesystem. On one machine ``run_sweep`` starts a local Ray instance with
``jobs`` CPU slots and gives each run ``cores // jobs`` torch threads; with ``ray_address`` it
uses an existing cluster (``ray start --head``). See docs/sweeps.md.

Ray is optional (``pip install "lance-cl[ray]"``); nothing here imports it before
:func:`run_sweep` runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

__all__ = [
    "FAULT_ENV",
    "FORWARDED_ENV",
    "RAY_INSTALL_HINT",
    "RayUnavailableError",
    "SweepOutcome",
    "SweepRun",
    "anchored",
    "call_on_worker",
    "import_ray",
    "local_cores",
    "local_instance",
    "run_sweep",
    "start_over",
    "sweep_runs",
]

RAY_INSTALL_HINT = 'pip install "lance-cl[ray]"'
# Test-only fault injection, read by the driver: "<run stem>:<k>:<marker file>" makes the worker of
# that run exit abruptly after k finished tasks, once (the marker file records that it happened).
FAULT_ENV = "LANCE_CL_SWEEP_FAULT"
DEFAULT_MAX_RETRIES = 3
# read by the benchmarks (default data root, downloads): the driver's values go to every task
FORWARDED_ENV = ("LANCE_CL_DATA", "LANCE_CL_DOWNLOAD")


class RayUnavailableError(ImportError):
    """Ray is not installed; the message says how to install it."""


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep."""

    benchmark: str
    strategy: str
    seed: int

    @property
    def stem(self) -> str:
        """File stem of the run's JSON and checkpoint (``<benchmark>__<strategy>__seed<k>``)."""
        from .run_files import result_path

        return result_path(".", self.benchmark, self.strategy, self.seed).stem


@dataclass
class SweepOutcome:
    """What a sweep produced: ``results`` holds the dict of every run that returned one (complete,
    or ``status`` "failed" with its ``error``), in sweep order; ``failures`` one
    ``(run, "ErrorType: message")`` per run that did not complete, in sweep order."""

    results: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[SweepRun, str]] = field(default_factory=list)


def sweep_runs(benchmarks: Sequence[str], strategies: Sequence[str], seeds: Sequence[int]) -> list[SweepRun]:
    """Every (benchmark, strategy, seed), benchmark-major then strategy then seed (the order of a
    sequential ``lance-cl run``)."""
    return [SweepRun(b, s, int(k)) for b in benchmarks for s in strategies for k in seeds]


def import_ray() -> Any:
    """The ``ray`` module, or :class:`RayUnavailableError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(
            f"parallel runs (--jobs > 1 or --ray-address) need Ray, which is not installed: "
            f"{RAY_INSTALL_HINT}") from exc
    return ray


def local_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _parse_fault(text: Optional[str]) -> Optional[tuple[str, int, str]]:
    if not text:
        return None
    stem, after, marker = text.split(":", 2)
    return stem, int(after), marker


def _crash_once(run: SweepRun, options: dict[str, Any], fault: tuple[str, int, str]) -> None:
    """Fault injection (tests): run ``k`` tasks of the run, record their train times in the marker
    file, and exit the worker process without any clean-up, the first time only."""
    from .runner import run_experiment

    stem, after, marker = fault
    if stem != run.stem:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return   # already crashed once: this is the retry
    partial = run_experiment(run.benchmark, run.strategy, run.seed, max_tasks=after,
                             progress=False, **options)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"train_time_s": [t["train_time_s"] for t in partial["per_task"]]}, f)
    os._exit(17)


def _run_task(run: SweepRun, options: dict[str, Any], torch_threads: int, env: dict[str, str],
              fault: Optional[tuple[str, int, str]] = None) -> dict[str, Any]:
    """Body of one Ray task: ``{"run": results dict or None, "error": None or "Type: message"}``.

    An exception of the run is returned, not raised (Ray retries only dead workers); the failed
    run's JSON, which the runner wrote before re-raising (status "failed"), travels back with it.
    """
    import torch

    from .run_files import json_safe
    from .runner import result_path, run_experiment

    os.environ.update(env)   # the driver's data settings, also on other nodes
    torch.set_num_threads(max(1, int(torch_threads)))   # the benchmark's or --threads win over it
    if fault is not None:
        _crash_once(run, options, fault)
    try:
        # as the run JSON holds it: plain Python, which the driver unpickles without torch
        result = run_experiment(run.benchmark, run.strategy, run.seed, progress=False, **options)
        return {"run": json_safe(result), "error": None}
    except Exception as exc:
        path = result_path(options["out_dir"], run.benchmark, run.strategy, run.seed)
        try:
            failed = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            failed = None
        if not isinstance(failed, dict) or failed.get("status") != "failed":
            failed = None   # failed before the runner wrote anything: not an older run's file
        return {"run": failed, "error": f"{type(exc).__name__}: {exc}"}


def start_over(out_dir: Union[str, Path], runs: Iterable[SweepRun]) -> list[Path]:
    """Delete the result JSON and the checkpoints of ``runs`` under ``out_dir`` (a checkpoint's
    older copies beside it too, not the ``*.corrupt`` files set aside for inspection); returns
    what was deleted."""
    from .run_files import checkpoint_path, result_path

    deleted = []
    for run in runs:
        checkpoint = checkpoint_path(out_dir, run.benchmark, run.strategy, run.seed)
        candidates = [result_path(out_dir, run.benchmark, run.strategy, run.seed),
                      *checkpoint.parent.glob(f"{checkpoint.name}*")]
        for path in candidates:
            if path.is_file() and not path.name.endswith(".corrupt"):
                path.unlink()
                deleted.append(path)
    return deleted


def anchored(path: Union[str, Path]) -> str:
    """A relative path made absolute from this directory; absolute and ``~`` paths as given
    (``~`` is each node's home)."""
    text = str(path)
    return text if text.startswith("~") or Path(text).is_absolute() else str(Path(text).resolve())


def _ray_error(exc: BaseException) -> str:
    """One line for a Ray-level failure (worker died more often than allowed, task cancelled ...)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"


def _start_ray(ray: Any, *, slots: Optional[int], address: Optional[str], gpus_per_run: float) -> bool:
    """Connect to ``address`` or start a local instance with ``slots`` CPUs; True when this call
    started (or connected) Ray and so must shut it down. An already initialised Ray is reused."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if address:
        ray.init(address=address, **quiet)
    else:
        # address="local": a fresh instance even when RAY_ADDRESS points elsewhere. Ray starts its
        # workers at niceness 15, which on a busy machine starves them next to any ordinary
        # process (a sequential run among them); the runs are the work here, so niceness 0.
        ray.init(address="local", num_cpus=slots, object_store_memory=200 * 2**20,
                 _system_config={"worker_niceness": 0}, **quiet)
        if gpus_per_run > 0 and ray.cluster_resources().get("GPU", 0) < gpus_per_run:
            ray.shutdown()
            raise RuntimeError(f"--gpus-per-run {gpus_per_run:g}: Ray sees no GPU on this machine "
                               "(check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    return True


def _warm_up() -> int:
    """Body of a warm-up task: import what every run imports (torch, Avalanche, the runner)."""
    from . import runner  # noqa: F401

    return os.getpid()


def _call_with_env(fn: Callable[..., Any], env: dict[str, str], args: tuple, kwargs: dict) -> Any:
    os.environ.update(env)
    return fn(*args, **kwargs)


def call_on_worker(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` as a one-CPU task on the initialised Ray instance, with the
    driver's data settings (:data:`FORWARDED_ENV`): what a run's worker sees, and the imports
    it needs happen there, not in the driver. Returns its result; its exception is raised."""
    ray = import_ray()
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    task = ray.remote(_call_with_env).options(num_cpus=1, max_retries=0)
    try:
        return ray.get(task.remote(fn, env, args, kwargs))
    except ray.exceptions.RayTaskError as exc:
        raise exc.as_instanceof_cause() from None


@contextlib.contextmanager
def local_instance(slots: int, gpus_per_run: float = 0.0) -> Iterator[Any]:
    """A local Ray instance with ``slots`` CPU slots for the duration of the block, its workers
    warming up meanwhile: one task per slot imports what a run imports, so that this cost is
    paid while the sweep is checked (:func:`call_on_worker`) instead of delaying the first runs.
    Yields the ``ray`` module; shuts the instance down on leaving unless Ray was already
    initialised (then that instance is used and left running)."""
    ray = import_ray()
    owned = _start_ray(ray, slots=slots, address=None, gpus_per_run=gpus_per_run)
    try:
        if owned:
            warm = ray.remote(_warm_up).options(num_cpus=1, max_retries=0)
            for _ in range(slots):
                warm.remote()
        yield ray
    finally:
        if owned:
            ray.shutdown()


class _Progress:
    """One line per finished run (always) and an overall bar (unless disabled): redrawn on a
    terminal, whole lines in a log (:func:`lance_cl.progress.progress_bar`)."""

    def __init__(self, total: int, bar: bool) -> None:
        from lance_cl.progress import progress_bar

        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.bar = progress_bar(total=total, desc="sweep", unit="run", disable=not bar)

    def finished(self, run: SweepRun, result: Optional[dict[str, Any]], error: Optional[str]) -> None:
        self.done += 1
        if error is None and result is not None:
            what = f"ACC {_num(result.get('acc'))}  BWT {_num(result.get('bwt'))}"
        else:
            what = f"FAILED {error}"
        elapsed = time.perf_counter() - self.start
        self.bar.write(f"[{self.done}/{self.total}] {run.stem}: {what}  ({elapsed:.0f} s elapsed)",
                       file=sys.stderr)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"


def run_sweep(
    runs: Iterable[SweepRun],
    *,
    run_options: dict[str, Any],
    jobs: Optional[int] = None,
    ray_address: Optional[str] = None,
    gpus_per_run: float = 0.0,
    progress: bool = True,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> SweepOutcome:
    """Run every run as one Ray task and write each returned run JSON to ``run_options["out_dir"]``.

    ``run_options``: keyword arguments of :func:`~lance_cl.cl.runner.run_experiment` shared by the
    runs (``out_dir`` required; ``epochs``, ``data_root``, ``device``, ``quick``, ``resume``,
    ``threads``, ``overrides``). Without ``ray_address`` (and no Ray already initialised) a local
    instance with ``jobs`` CPU slots (default 2) runs ``jobs`` runs at a time with
    ``local_cores() // jobs`` torch threads each, unless ``threads`` (or the benchmark's
    ``threads`` default) says otherwise. With ``ray_address`` each task asks for ``threads``
    (default 1) CPUs and ``jobs`` caps the runs in flight (default: no cap). ``gpus_per_run``
    (fractions allowed below 1) is each task's ``num_gpus``; pass ``device="cuda"``, Ray sets
    ``CUDA_VISIBLE_DEVICES`` per task. Each finished run prints one line to stderr; ``progress``
    adds the overall bar. A worker that dies is retried ``max_retries`` times and
    resumes from its checkpoint; a run that raises is reported in ``failures`` and the others go
    on. ``resume=False`` deletes the runs' JSONs and checkpoints under ``out_dir`` (on the driver's
    filesystem) once before submitting; the tasks themselves always resume. Raises
    :class:`RayUnavailableError` without Ray; on KeyboardInterrupt the tasks in flight
    are cancelled and Ray is shut down before it propagates.
    """
    runs = list(runs)
    options = dict(run_options)
    options.setdefault("resume", True)
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if gpus_per_run < 0 or (gpus_per_run > 1 and gpus_per_run != int(gpus_per_run)):
        raise ValueError(f"gpus_per_run must be a fraction in [0, 1] or a whole number, got {gpus_per_run}")
    ray = import_ray()
    from .run_files import result_path, write_json_atomic

    if not options.pop("resume"):
        start_over(options["out_dir"], runs)   # once: the tasks resume, so a retry keeps its progress
    options["resume"] = True

    for key in ("out_dir", "data_root"):   # a worker's current directory is not the driver's
        if options.get(key) is not None:
            options[key] = anchored(options[key])
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    fault = _parse_fault(os.environ.get(FAULT_ENV))
    threads = options.get("threads")
    if ray_address:
        slots, cpus_per_task = None, int(threads or 1)
        torch_threads, in_flight = cpus_per_task, jobs or len(runs)
    else:
        slots = jobs or 2
        cpus_per_task, torch_threads = 1, int(threads or max(1, local_cores() // slots))
        in_flight = len(runs)   # the local instance's slots do the limiting
    owned = _start_ray(ray, slots=slots, address=ray_address, gpus_per_run=gpus_per_run)
    task = ray.remote(_run_task).options(
        num_cpus=cpus_per_task, num_gpus=gpus_per_run, max_retries=max_retries, retry_exceptions=False)
    order = {run: i for i, run in enumerate(runs)}
    returned: dict[SweepRun, dict[str, Any]] = {}
    errors: dict[SweepRun, str] = {}
    bar = _Progress(len(runs), progress)
    queue = list(runs)
    pending: dict[Any, SweepRun] = {}
    try:
        while queue or pending:
            while queue and len(pending) < in_flight:
                run = queue.pop(0)
                pending[task.remote(run, options, torch_threads, env, fault)] = run
            ready, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ready[0])
            try:
                reply = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                reply = {"run": None, "error": _ray_error(exc)}
            if reply["run"] is not None:
                returned[run] = reply["run"]
                write_json_atomic(result_path(options["out_dir"], run.benchmark, run.strategy,
                                              run.seed), reply["run"])
            error = reply["error"]
            if error is None and reply["run"].get("status") != "complete":
                error = f"run ended with status {reply['run'].get('status')!r}"
            if error is not None:
                errors[run] = error
            bar.finished(run, reply["run"], error)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
        if owned:
            ray.shutdown()
    return SweepOutcome(
        results=[returned[r] for r in sorted(returned, key=order.__getitem__)],
        failures=[(r, errors[r]) for r in sorted(errors, key=order.__getitem__)],
    )

