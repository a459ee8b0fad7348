"""One continual-learning experiment: (benchmark, strategy, seed) -> results JSON + checkpoints.

:func:`run_experiment` trains the strategy task after task, tests every task after each one
(accuracy matrix R in percent), measures the three memory figures of SPEC 4.4 and writes,
after every task, ``<out>/<benchmark>__<strategy>__seed<k>.json`` (atomically) and a
checkpoint ``<out>/checkpoints/<same stem>.pt``. A run that dies keeps its finished tasks and
resumes from the checkpoint; a complete JSON with the same config is not run again.

Results JSON (``format`` "lance-cl-run/1"): ``config`` (benchmark, strategy, seed, epochs, quick,
device, data_root, the benchmark defaults), ``versions``, ``status`` ("running" / "complete" /
"failed", with ``error`` and ``traceback``), ``n_tasks``, ``completed_tasks``,
``accuracy_matrix`` (one row of T accuracies in % per finished task; entries j > i are the
untrained heads), ``acc`` / ``bwt`` / ``forgetting`` / ``learning_accuracy`` over the finished
tasks, ``per_task`` (train / eval seconds, epochs run, best epoch, validation history, memory:
activation bytes and peak step bytes of one step measured by :class:`ActivationMemoryProbe`,
plus ``memory_figures(strategy)``: persistent and training-extra bytes), ``memory`` (peak
activation, peak step and training-extra bytes over tasks, persistent bytes after the last
task), ``train_time_s``.

Strategy recipes come from :mod:`lance_cl.strategies` (looked up at call time):
``build_strategy(name, model, spec, *, device, epochs, extra_plugins[, evaluator])``,
``memory_figures(strategy)``, ``strategy_state(strategy)``, ``load_strategy_state(strategy, s)``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import random
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import is_multi_task_module
from torch import nn

from .metrics import summary
from .protocol import GPMSchedulePlugin, evaluate_accuracy

__all__ = [
    "ActivationMemoryProbe",
    "RESULT_FORMAT",
    "body_layer_names",
    "checkpoint_path",
    "quiet_evaluator",
    "result_path",
    "measure_step_memory",
    "run_experiment",
    "run_many",
    "run_stem",
    "seed_everything",
]

RESULT_FORMAT = "lance-cl-run/1"
# config keys that must match for a saved run / checkpoint to be reused
_MATCH_KEYS = ("benchmark", "strategy", "seed", "epochs", "quick")


def run_stem(benchmark: str, strategy: str, seed: int) -> str:
    """File stem of one run: ``<benchmark>__<strategy>__seed<k>``."""
    return f"{benchmark}__{strategy}__seed{seed}"


def result_path(out_dir: Union[str, Path], benchmark: str, strategy: str, seed: int) -> Path:
    """Where :func:`run_experiment` writes the results JSON."""
    return Path(out_dir) / f"{run_stem(benchmark, strategy, seed)}.json"


def checkpoint_path(out_dir: Union[str, Path], benchmark: str, strategy: str, seed: int) -> Path:
    """Where :func:`run_experiment` writes the checkpoint of the last finished task."""
    return Path(out_dir) / "checkpoints" / f"{run_stem(benchmark, strategy, seed)}.pt"


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def quiet_evaluator() -> Any:
    """An Avalanche ``EvaluationPlugin`` with no metrics and no loggers (prints nothing)."""
    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(loggers=[])


def body_layer_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` / ``nn.Conv2d`` (compressed or not) outside ``model.heads``."""
    heads = getattr(model, "heads", None)
    head_ids = {id(m) for m in heads.modules()} if isinstance(heads, nn.Module) else set()
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in head_ids
    ]


class ActivationMemoryProbe(SupervisedPlugin):
    """Measures the activation and peak memory of one training step at the first iteration of
    each task.

    At that point every plugin's ``before_training_exp`` has run, so the model is in the exact
    configuration it trains in (compressed layers, factors of the task). One extra forward +
    backward on the current mini-batch goes through
    :func:`lance_cl.measure_activation_memory`; the global RNG, every buffer and the parameters'
    ``.grad`` are restored afterwards, so training is unaffected. ``results[i]`` holds, for
    experience i: ``activation_total_bytes`` (every tensor autograd saved, deduplicated by
    storage), ``activation_layers_bytes`` (over :func:`body_layer_names`, the same layer set for
    every method), ``activation_per_layer_bytes`` (those layers one by one),
    ``peak_step_bytes`` (peak bytes allocated during the step above its start: activations,
    gradients incl. the parameters' ``.grad``, temporaries; see
    :func:`lance_cl.accounting.measure_peak_step_memory`; None when it could not be measured),
    ``activation_batch_size`` and ``cuda_peak_bytes`` (forward only; None on CPU).
    """

    def __init__(self) -> None:
        super().__init__()
        self.results: dict[int, dict[str, Any]] = {}
        self._pending: Optional[int] = None

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._pending = int(strategy.experience.current_experience)

    def before_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self._pending is None:
            return
        exp, self._pending = self._pending, None
        self.results[exp] = measure_step_memory(strategy.model, strategy.mb_x, strategy.mb_y, strategy.mb_task_id)


def _check_finite(task: int, history: list[dict[str, Any]], accuracies: list[float]) -> None:
    """A diverged task (NaN/inf validation loss or accuracy) is a failure, not a result."""
    bad = [h for h in history
           if h.get("val_loss") is not None and not math.isfinite(float(h["val_loss"]))]
    if bad or not all(math.isfinite(a) for a in accuracies):
        where = f" from epoch {bad[0].get('epoch')} (lr {bad[0].get('lr')})" if bad else ""
        raise FloatingPointError(
            f"task {task} diverged: non-finite validation loss or accuracy{where}; lower the "
            f"learning rate or the method's regularisation strength")


def measure_step_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
    """Activation bytes and peak step bytes of one cross-entropy training step on (x, y, t).

    Side-effect free: the global RNG (and the device's), every buffer and the parameters'
    ``.grad`` are as before. One pass: saved-tensor hooks and the peak measurement together.
    """
    from lance_cl import measure_activation_memory

    device = x.device
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    inputs = (x, t) if is_multi_task_module(model) else x
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        stats = measure_activation_memory(
            model, inputs, lambda out: F.cross_entropy(out, y), layers=body_layer_names(model),
            count_buffers=False,   # fixed factors are training-time state (SPEC 4.4 c), not activations
        )
    with torch.no_grad():
        for b, saved in buffers:
            if b.shape == saved.shape:
                b.copy_(saved)
    layers = body_layer_names(model)
    return {
        "activation_total_bytes": int(stats["total"]),
        "activation_layers_bytes": int(stats["selected"]),
        "activation_per_layer_bytes": {n: int(stats["per_layer"].get(n, 0)) for n in layers},
        "peak_step_bytes": None if stats.get("peak_bytes") is None else int(stats["peak_bytes"]),
        "activation_batch_size": int(x.shape[0]),
        "cuda_peak_bytes": None if stats.get("cuda_peak") is None else int(stats["cuda_peak"]),
    }


# -- helpers ----------------------------------------------------------------------------------------


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


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy / torch scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_clean(data), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def _save_checkpoint(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(data, tmp)
    os.replace(tmp, path)


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    from lance_cl import wrap

    fn = getattr(wrap, "plain_state_dict", None)
    if fn is not None:
        return fn(model)
    return {k: v for k, v in model.state_dict().items() if ".compressor." not in k}


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
    clock = getattr(strategy, "clock", None)
    if clock is None:
        return {}
    return {k: v for k, v in vars(clock).items() if isinstance(v, int) and not isinstance(v, bool)}


def _matches(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in _MATCH_KEYS)


def _call_build_strategy(name: str, model: nn.Module, spec: Any, **kwargs: Any) -> Any:
    from lance_cl import strategies

    build = strategies.build_strategy
    params = inspect.signature(build).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "evaluator" in params or takes_any:
        kwargs["evaluator"] = quiet_evaluator()
    return build(name, model, spec, **kwargs)


def _metrics_of(rows: list[list[float]]) -> dict[str, Optional[float]]:
    if not rows:
        return {"acc": None, "bwt": None, "forgetting": None, "learning_accuracy": None}
    return summary(np.asarray(rows, dtype=np.float64))


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


# -- the experiment ----------------------------------------------------------------------------------


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
    same config continues from the next task. Exceptions are recorded (status "failed",
    ``error``) and re-raised. ``threads`` (default: the benchmark's ``defaults["threads"]``,
    else unchanged) sets ``torch.set_num_threads`` for the run: tiny models on a shared CPU
    run many times faster on one thread than on several competing ones.
    """
    previous_threads = torch.get_num_threads()
    try:
        return _run(benchmark, strategy, seed, out_dir=out_dir, epochs=epochs, data_root=data_root,
                    device=device, quick=quick, resume=resume, progress=progress,
                    max_tasks=max_tasks, threads=threads, overrides=overrides)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    benchmark: str,
    strategy: str,
    seed: int,
    *,
    out_dir: Union[str, Path],
    epochs: Optional[int],
    data_root: Optional[Union[str, Path]],
    device: str,
    quick: bool,
    resume: bool,
    progress: bool,
    max_tasks: Optional[int],
    threads: Optional[int],
    overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from lance_cl import strategies
    from lance_cl.benchmarks import get_benchmark

    out = Path(out_dir)
    json_file = result_path(out, benchmark, strategy, seed)
    ckpt_file = checkpoint_path(out, benchmark, strategy, seed)

    seed_everything(seed)
    spec = get_benchmark(benchmark, data_root=data_root, seed=seed, quick=quick)
    if overrides:
        spec.defaults.update(overrides)
    max_epochs = int(epochs if epochs is not None else spec.defaults["epochs"])
    if threads is None:
        threads = spec.defaults.get("threads")
    if threads is not None and str(device).startswith("cpu"):
        torch.set_num_threads(int(threads))
    config = {
        "benchmark": benchmark,
        "strategy": strategy,
        "seed": int(seed),
        "epochs": max_epochs,
        "quick": bool(quick),
        "device": str(device),
        "data_root": None if data_root is None else str(data_root),
        "defaults": dict(spec.defaults),
    }
    if resume and json_file.is_file():
        try:
            previous = json.loads(json_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous and previous.get("status") == "complete" and _matches(previous.get("config", {}), config):
            return previous

    n_tasks = len(spec.train_stream)
    results: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "config": config,
        "versions": _versions(),
        "status": "running",
        "error": None,
        "n_tasks": n_tasks,
        "completed_tasks": 0,
        "accuracy_matrix": [],
        "acc": None,
        "bwt": None,
        "forgetting": None,
        "learning_accuracy": None,
        "per_task": [],
        "memory": {},
        "train_time_s": 0.0,
    }
    try:
        model = spec.model_factory()
        d = spec.defaults
        schedule = GPMSchedulePlugin(
            spec.val_datasets,
            lr=d["lr"],
            lr_factor=d.get("lr_factor", 2.0),
            patience=d.get("patience", 6),
            lr_min=d.get("lr_min", 1e-5),
            eval_mb_size=d.get("eval_batch_size", 256),
        )
        probe = ActivationMemoryProbe()
        strat = _call_build_strategy(
            strategy, model, spec, device=device, epochs=max_epochs, extra_plugins=[schedule, probe]
        )
        start = 0
        if resume and ckpt_file.is_file():
            ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
            if _matches(ckpt.get("config", {}), config):
                start = int(ckpt["completed_tasks"])
                strat.model.load_state_dict(ckpt["model"], strict=False)
                strategies.load_strategy_state(
                    strat, ckpt["strategy"], [spec.train_stream[j].dataset for j in range(start)])
                strat.optimizer.load_state_dict(ckpt["optimizer"])
                for k, v in ckpt.get("clock", {}).items():
                    setattr(strat.clock, k, v)
                schedule.load_state_dict(ckpt.get("schedule", {}))
                results.update({k: ckpt["results"][k] for k in (
                    "accuracy_matrix", "per_task", "completed_tasks", "train_time_s")})
                results["versions_at_start"] = ckpt["results"].get("versions")
                _set_rng_state(ckpt["rng"])
        stop = n_tasks if max_tasks is None else min(n_tasks, int(max_tasks))
        eval_bs = int(d.get("eval_batch_size", 256))
        bar = tqdm(
            total=n_tasks, initial=start, desc=run_stem(benchmark, strategy, seed), unit="task",
            disable=not progress, leave=True, dynamic_ncols=True,
        )
        try:
            for i in range(start, stop):
                t0 = time.perf_counter()
                strat.train(spec.train_stream[i], eval_streams=[])
                train_time = time.perf_counter() - t0
                t1 = time.perf_counter()
                row = [
                    evaluate_accuracy(
                        strat.model, exp.dataset, task_label=int(exp.task_label),
                        batch_size=eval_bs, device=device,
                    )[1]
                    for exp in spec.test_stream
                ]
                eval_time = time.perf_counter() - t1
                _check_finite(i, schedule.history.get(i, []), row)
                memory = dict(probe.results.get(i, {}))
                memory.update({k: v for k, v in strategies.memory_figures(strat).items()})
                history = schedule.history.get(i, [])
                results["accuracy_matrix"].append(row)
                results["per_task"].append({
                    "task": i,
                    "train_time_s": train_time,
                    "eval_time_s": eval_time,
                    "epochs_run": len(history),
                    "best_epoch": schedule.best_epoch.get(i),
                    "val_history": history,
                    "memory": memory,
                    "layers": strategies.task_diagnostics(strat, i),
                })
                results["completed_tasks"] = i + 1
                results["train_time_s"] = float(results["train_time_s"]) + train_time
                results.update(_metrics_of(results["accuracy_matrix"]))
                results["memory"] = _memory_summary(results["per_task"])
                if i + 1 == n_tasks:
                    results["status"] = "complete"
                _write_json(json_file, results)
                _save_checkpoint(ckpt_file, {
                    "config": config,
                    "completed_tasks": i + 1,
                    "model": _plain_state_dict(strat.model),
                    "optimizer": strat.optimizer.state_dict(),
                    "strategy": strategies.strategy_state(strat),
                    "schedule": schedule.state_dict(),
                    "clock": _clock_state(strat),
                    "rng": _rng_state(),
                    "results": _clean(results),
                })
                bar.update(1)
                bar.set_postfix(acc=f"{results['acc']:.1f}", bwt=f"{results['bwt']:.1f}")
        finally:
            bar.close()
        # metrics of the rows so far (also when resumed with nothing left to do)
        results.update(_metrics_of(results["accuracy_matrix"]))
        results["memory"] = _memory_summary(results["per_task"])
        if results["completed_tasks"] == n_tasks:
            results["status"] = "complete"
        _write_json(json_file, results)
        return _clean(results)
    except BaseException as exc:  # record, then re-raise (KeyboardInterrupt included)
        results["status"] = "failed"
        results["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        results["traceback"] = traceback.format_exc()
        try:
            _write_json(json_file, results)
        except Exception:  # pragma: no cover - keep the original error
            pass
        raise


def run_many(
    benchmark: str,
    strategies_: Sequence[str],
    seeds: Sequence[int],
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`run_experiment` for every (strategy, seed), in that order; returns the results."""
    return [run_experiment(benchmark, s, k, **kwargs) for s in strategies_ for k in seeds]
