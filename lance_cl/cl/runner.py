"""One continual-learning experiment: (benchmark, strategy, seed) -> results JSON + checkpoints.

:func:`run_experiment` trains the strategy task after task, tests every task after each one
(accuracy matrix R in percent), measures the memory figures and writes, after every task,
``<out>/<benchmark>__<strategy>__seed<k>.json`` and a checkpoint
``<out>/checkpoints/<same stem>.pt`` (keeping the previous one as ``.pt.prev``), both durably
and atomically (:mod:`lance_cl.cl.run_files`). A run that dies keeps its finished tasks and
resumes from the checkpoint, from the previous one when the newest is damaged; a complete JSON
with the same config is not run again.

Results JSON (``format`` "lance-cl-run/1"): ``config`` (benchmark, strategy, seed, epochs, quick,
device, data_root, the benchmark defaults), ``versions``, ``status`` ("running" / "complete" /
"failed", with ``error`` and ``traceback``), ``n_tasks``, ``completed_tasks``,
``accuracy_matrix`` (one row of T accuracies in % per finished task; entries j > i are the
untrained heads), ``acc`` / ``bwt`` / ``forgetting`` / ``learning_accuracy`` over the finished
tasks, ``per_task`` (train / eval seconds, epochs run, best epoch, validation history, memory:
activation bytes and peak step bytes of one step measured by :class:`ActivationMemoryProbe`,
plus ``memory_figures(strategy)``: persistent and training-extra bytes; ``layers``: the
method's per-layer decisions), ``memory`` (peak activation, peak step and training-extra bytes
over tasks, persistent bytes after the last task), ``train_time_s``.

Strategies come from :mod:`lance_cl.strategies` (``build_strategy``, ``memory_figures``,
``task_diagnostics``, ``strategy_state``, ``load_strategy_state``), looked up at call time.
"""

from __future__ import annotations

import math
import platform
import random
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .. import strategies as recipes
from ..benchmarks import get_benchmark
from ..progress import progress_bar
from ..wrap import plain_state_dict
from .metrics import summary
from .protocol import GPMSchedulePlugin, evaluate_accuracy
from .run_files import (RESULT_FORMAT, RunFileError, checkpoint_path, configs_match, json_safe,
                        load_checkpoint, read_result, remove_checkpoints, result_path, run_stem,
                        save_checkpoint, write_json_atomic)
from .step_memory import ActivationMemoryProbe, body_layer_names, measure_step_memory

__all__ = [
    "ActivationMemoryProbe",
    "RESULT_FORMAT",
    "RunFileError",
    "body_layer_names",
    "check_experiments",
    "checkpoint_path",
    "measure_step_memory",
    "result_path",
    "run_experiment",
    "run_stem",
    "seed_everything",
]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_experiments(benchmark: str, strategies: Sequence[str], *,
                      data_root: Optional[Union[str, Path]] = None, quick: bool = False) -> None:
    """Check every name of a batch of runs before the first one trains: the benchmark, each
    strategy, and that the benchmark's data set is present (loaded once). Raises ValueError
    (unknown strategy, listing the known ones), KeyError (unknown benchmark, likewise) or
    :class:`lance_cl.data.DatasetNotFoundError` (naming the missing files)."""
    for name in strategies:
        recipes.parse_strategy(name)
    get_benchmark(benchmark, data_root=data_root, seed=0, quick=quick)


# -- the results dict -------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import avalanche

    import lance_cl

    return {
        "lance_cl": lance_cl.__version__,
        "torch": torch.__version__,
        "avalanche": getattr(avalanche, "__version__", "unknown"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _new_results(config: dict[str, Any], n_tasks: int) -> dict[str, Any]:
    return {
        "format": RESULT_FORMAT, "config": config, "versions": _versions(), "status": "running",
        "error": None, "n_tasks": n_tasks, "completed_tasks": 0, "accuracy_matrix": [],
        "acc": None, "bwt": None, "forgetting": None, "learning_accuracy": None,
        "per_task": [], "memory": {}, "train_time_s": 0.0,
    }


def _restore_results(results: dict[str, Any], checkpoint: dict[str, Any]) -> None:
    """The finished tasks' results as the checkpoint recorded them."""
    saved = checkpoint["results"]
    results.update({k: saved[k] for k in ("accuracy_matrix", "per_task", "completed_tasks", "train_time_s")})
    results["versions_at_start"] = saved.get("versions")
    _summarise(results)


def _memory_summary(per_task: list[dict[str, Any]]) -> dict[str, Optional[int]]:
    """Peak activation / peak step / training-extra bytes over tasks; persistent bytes after the
    last task."""

    def peak(key: str) -> Optional[int]:
        vals = [t["memory"].get(key) for t in per_task if t["memory"].get(key) is not None]
        return max(vals) if vals else None

    last = per_task[-1]["memory"] if per_task else {}
    return {
        "activation_total_bytes": peak("activation_total_bytes"),
        "activation_layers_bytes": peak("activation_layers_bytes"),
        "peak_step_bytes": peak("peak_step_bytes"),
        "persistent_bytes": last.get("persistent_bytes"),
        "training_extra_bytes": peak("training_extra_bytes"),
    }


def _summarise(results: dict[str, Any]) -> None:
    """Metrics over the finished tasks' rows, the memory summary and the status."""
    rows = results["accuracy_matrix"]
    if rows:
        results.update(summary(np.asarray(rows, dtype=np.float64)))
    else:
        results.update(acc=None, bwt=None, forgetting=None, learning_accuracy=None)
    results["memory"] = _memory_summary(results["per_task"])
    if results["completed_tasks"] == results["n_tasks"]:
        results["status"] = "complete"


def _add_task(results: dict[str, Any], row: list[float], record: dict[str, Any]) -> None:
    results["accuracy_matrix"].append(row)
    results["per_task"].append(record)
    results["completed_tasks"] = record["task"] + 1
    results["train_time_s"] = float(results["train_time_s"]) + record["train_time_s"]
    _summarise(results)


def _record_failure(results: dict[str, Any], exc: BaseException) -> None:
    results["status"] = "failed"
    results["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    results["traceback"] = traceback.format_exc()


def _check_finite(task: int, history: list[dict[str, Any]], accuracies: list[float]) -> None:
    """A diverged task (NaN/inf validation loss or accuracy) is a failure, not a result."""
    bad = [h for h in history
           if h.get("val_loss") is not None and not math.isfinite(float(h["val_loss"]))]
    if bad or not all(math.isfinite(a) for a in accuracies):
        where = f" from epoch {bad[0].get('epoch')} (lr {bad[0].get('lr')})" if bad else ""
        raise FloatingPointError(
            f"task {task} diverged: non-finite validation loss or accuracy{where}; lower the "
            f"learning rate or the method's regularisation strength")


# -- the global state a checkpoint carries ----------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _clock_state(strategy: Any) -> dict[str, int]:
    return {k: v for k, v in vars(strategy.clock).items() if isinstance(v, int) and not isinstance(v, bool)}


# -- one strategy trained task by task --------------------------------------------------------------


class _TaskTrainer:
    """The strategy of one run with its validation schedule and memory probe: trains and tests
    one task at a time, and saves / restores everything a resume needs."""

    def __init__(self, spec: Any, strategy: str, *, device: str, epochs: int) -> None:
        d = spec.defaults
        self.spec, self.device = spec, device
        self.eval_batch_size = int(d.get("eval_batch_size", 256))
        model = spec.model_factory()
        self.schedule = GPMSchedulePlugin(
            spec.val_datasets, lr=d["lr"], lr_factor=d.get("lr_factor", 2.0),
            patience=d.get("patience", 6), lr_min=d.get("lr_min", 1e-5),
            eval_mb_size=d.get("eval_batch_size", 256))
        self.probe = ActivationMemoryProbe()
        self.strategy = recipes.build_strategy(
            strategy, model, spec, device=device, epochs=epochs, extra_plugins=[self.schedule, self.probe])

    def train_task(self, i: int) -> tuple[list[float], dict[str, Any]]:
        """Train task ``i``, test every task: (accuracy row in %, the task's per-task record)."""
        t0 = time.perf_counter()
        self.strategy.train(self.spec.train_stream[i], eval_streams=[])
        train_time = time.perf_counter() - t0
        t1 = time.perf_counter()
        row = [evaluate_accuracy(self.strategy.model, exp.dataset, task_label=int(exp.task_label),
                                 batch_size=self.eval_batch_size, device=self.device)[1]
               for exp in self.spec.test_stream]
        eval_time = time.perf_counter() - t1
        history = self.schedule.history.get(i, [])
        _check_finite(i, history, row)
        memory = {**self.probe.results.get(i, {}), **recipes.memory_figures(self.strategy)}
        return row, {
            "task": i, "train_time_s": train_time, "eval_time_s": eval_time,
            "epochs_run": len(history), "best_epoch": self.schedule.best_epoch.get(i),
            "val_history": history, "memory": memory,
            "layers": recipes.task_diagnostics(self.strategy, i),
        }

    def checkpoint(self, config: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
        """Everything :meth:`restore` needs to continue after the finished tasks."""
        return {
            "config": config,
            "completed_tasks": results["completed_tasks"],
            "model": plain_state_dict(self.strategy.model),
            "optimizer": self.strategy.optimizer.state_dict(),
            "strategy": recipes.strategy_state(self.strategy),
            "schedule": self.schedule.state_dict(),
            "clock": _clock_state(self.strategy),
            "rng": _rng_state(),
            "results": json_safe(results),
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Model (strictly: every key), plugins, optimizer, clock, schedule and global RNG as
        they were after the checkpoint's last task."""
        done = int(checkpoint["completed_tasks"])
        strategy = self.strategy
        strategy.model.load_state_dict(checkpoint["model"], strict=True)
        recipes.load_strategy_state(strategy, checkpoint["strategy"],
                                       [self.spec.train_stream[j].dataset for j in range(done)])
        strategy.optimizer.load_state_dict(checkpoint["optimizer"])
        for k, v in checkpoint.get("clock", {}).items():
            setattr(strategy.clock, k, v)
        self.schedule.load_state_dict(checkpoint.get("schedule", {}))
        _set_rng_state(checkpoint["rng"])


# -- the experiment ---------------------------------------------------------------------------------


def run_experiment(
    benchmark: str,
    strategy: str,
    seed: int,
    *,
    out_dir: Union[str, Path],
    epochs: Optional[int] = None,
    data_root: Optional[Union[str, Path]] = None,
    device: str = "cpu",
    quick: bool = False,
    resume: bool = True,
    progress: bool = True,
    max_tasks: Optional[int] = None,
    threads: Optional[int] = None,
    overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Run ``strategy`` on ``benchmark`` with ``seed``; returns the results dict (also on disk).

    ``overrides`` replace entries of the benchmark's defaults (e.g. ``{"train_energy": 0.7}``);
    they are part of the recorded config, so a resume only continues a run made with the same.

    ``epochs`` overrides the benchmark's maximum epochs per task; ``max_tasks`` stops after
    that many tasks (status stays "running", so a later call resumes). With ``resume`` an
    existing complete result with the same config is returned as is, and a checkpoint with the
    same config continues from the next task (a damaged checkpoint or JSON: see
    :mod:`lance_cl.cl.run_files`; :class:`RunFileError` when no checkpoint is readable).
    Exceptions while training are recorded (status "failed", ``error``, the finished tasks
    kept) and re-raised. ``threads`` (default: the benchmark's ``defaults["threads"]``, else
    unchanged) sets ``torch.set_num_threads`` for the run: tiny models on a shared CPU run many
    times faster on one thread than on several competing ones.
    """
    previous_threads = torch.get_num_threads()
    try:
        spec, config = _prepare(benchmark, strategy, seed, epochs=epochs, data_root=data_root,
                                device=device, quick=quick, threads=threads, overrides=overrides)
        json_file = result_path(out_dir, benchmark, strategy, seed)
        ckpt_file = checkpoint_path(out_dir, benchmark, strategy, seed)
        checkpoint = None
        if resume:
            previous = read_result(json_file)
            if previous and previous.get("status") == "complete" and configs_match(previous.get("config", {}), config):
                return previous
            checkpoint = load_checkpoint(ckpt_file, config)
        else:
            remove_checkpoints(ckpt_file)
        return _train_tasks(spec, strategy, config, checkpoint, json_file, ckpt_file,
                            max_tasks=max_tasks, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)


def _prepare(benchmark: str, strategy: str, seed: int, *, epochs: Optional[int],
             data_root: Optional[Union[str, Path]], device: str, quick: bool, threads: Optional[int],
             overrides: Optional[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """The seeded benchmark (defaults overridden) and the run's config; sets the CPU threads."""
    seed_everything(seed)
    spec = get_benchmark(benchmark, data_root=data_root, seed=seed, quick=quick)
    spec.defaults.update(overrides or {})
    threads = spec.defaults.get("threads") if threads is None else threads
    if threads is not None and str(device).startswith("cpu"):
        torch.set_num_threads(int(threads))
    config = {
        "benchmark": benchmark, "strategy": strategy, "seed": int(seed),
        "epochs": int(epochs if epochs is not None else spec.defaults["epochs"]),
        "quick": bool(quick), "device": str(device),
        "data_root": None if data_root is None else str(data_root), "defaults": dict(spec.defaults),
    }
    return spec, config


def _train_tasks(spec: Any, strategy: str, config: dict[str, Any], checkpoint: Optional[dict[str, Any]],
                 json_file: Path, ckpt_file: Path, *, max_tasks: Optional[int], progress: bool) -> dict[str, Any]:
    """The tasks after the checkpoint's (all from task 0 without one; at most ``max_tasks`` in
    all), with the results JSON and a checkpoint written after each; a failure is recorded and
    re-raised."""
    results = _new_results(config, len(spec.train_stream))
    if checkpoint is not None:
        _restore_results(results, checkpoint)
    start = results["completed_tasks"]
    stop = results["n_tasks"] if max_tasks is None else min(results["n_tasks"], int(max_tasks))
    try:
        trainer = _TaskTrainer(spec, strategy, device=config["device"], epochs=config["epochs"])
        if checkpoint is not None:
            trainer.restore(checkpoint)
        with progress_bar(total=results["n_tasks"], initial=start, unit="task", leave=True,
                          desc=run_stem(config["benchmark"], strategy, config["seed"]),
                          disable=not progress, dynamic_ncols=True) as bar:
            for i in range(start, stop):
                row, record = trainer.train_task(i)
                _add_task(results, row, record)
                write_json_atomic(json_file, results)
                save_checkpoint(ckpt_file, trainer.checkpoint(config, results))
                bar.set_postfix(acc=f"{results['acc']:.1f}", bwt=f"{results['bwt']:.1f}", refresh=False)
                bar.update(1)
        write_json_atomic(json_file, results)   # also when resumed with nothing left to do
        return json_safe(results)
    except BaseException as exc:  # record, then re-raise (KeyboardInterrupt included)
        _record_failure(results, exc)
        try:
            write_json_atomic(json_file, results)
        except Exception:  # pragma: no cover - keep the original error
            pass
        raise
