"""The experiment: every (seed, layer setting, method) fine-tuned from the same pretrained weights,
the same head initialisation, data order and schedule; results written after each run. Also the
offline pretraining that produces the weights (:func:`pretrain`)."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .data import FinetuneData, load_finetune_data, model_input
from .loop import (batch_order, evaluate, finetuned_layer_names, interleaved_step_times,
                   run_method)
from .models import build_backbone, head_name, reset_head
from .protocol import FinetuneConfig
from .results import write_outputs

__all__ = ["machine_info", "pretrain", "run_finetune"]


def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, torch threads and versions (written next to every figure)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def _config_dict(config: FinetuneConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _time_interleaved(runs: list[dict[str, Any]], models: dict[str, Any], data: FinetuneData,
                      config: FinetuneConfig, seed: int) -> None:
    """Step time of the fine-tuned models of one (seed, layers) group, timed round-robin on the
    first training batch: ``time.interleaved_median_s`` of each run (what the table shows)."""
    if not models:
        return
    idx = batch_order(data.train_x.shape[0], config.batch_size, seed, 0)[0][0]
    device = torch.device(config.device)
    x = model_input(data.train_x[idx], config.image_size).to(device)
    medians = interleaved_step_times(models, x, data.train_y[idx].to(device))
    for run in runs:
        if run["method"] in medians:
            run["time"]["interleaved_median_s"] = medians[run["method"]]


def run_finetune(config: FinetuneConfig, out: Optional[str | Path] = None, *, progress: bool = True,
                 command: Optional[str] = None) -> dict[str, Any]:
    """Run the experiment; returns the result dictionary (what ``finetune.json`` holds).

    A method that raises becomes a ``failed`` run (its error recorded) and the others still run.
    With ``out``, the JSON, table and plot are rewritten after every run."""
    old_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(int(config.threads))
    try:
        data = load_finetune_data(config.dataset, config.data_root, image_size=config.image_size,
                                  train_limit=config.train_limit, test_limit=config.test_limit,
                                  download=config.download)
        base, weights = build_backbone(config.model, data.n_classes, config.weights)
        result: dict[str, Any] = {"command": command, "config": _config_dict(config),
                                  "machine": machine_info(), "data": data.info, "weights": weights,
                                  "runs": []}
        started = time.perf_counter()
        example = model_input(data.train_x[:2], config.image_size)
        methods = ["vanilla"] + [m for m in config.methods if m != "vanilla"] \
            if "vanilla" in config.methods else list(config.methods)
        plain = [head_name(config.model)] if config.head == "plain" else []
        for seed in config.seeds:
            reset_head(base, config.model, seed)
            for spec in config.layers:
                names = finetuned_layer_names(base, spec, example, plain[0] if plain else None)
                trained: dict[str, Any] = {}
                for method in methods:
                    label = f"layers {spec} / {method} / seed {seed}"
                    run: dict[str, Any] = {"layers_spec": str(spec), "method": method, "seed": seed}
                    try:
                        record, trained[method] = run_method(base, method, names, data, config,
                                                             seed, plain_layers=plain, label=label,
                                                             progress=progress)
                        run.update(status="ok", **record)
                    except Exception as e:  # one broken method must not stop the others
                        run.update(status="failed", layers=names, error=f"{type(e).__name__}: {e}")
                        print(f"lance-cl finetune: {label} failed: {run['error']}", file=sys.stderr)
                    result["runs"].append(run)
                    result["elapsed_s"] = time.perf_counter() - started
                    if out is not None:
                        write_outputs(result, out, plot=False)
                _time_interleaved(result["runs"][-len(methods):], trained, data, config, seed)
        if out is not None:
            write_outputs(result, out)
        return result
    finally:
        torch.set_num_threads(old_threads)


def pretrain(model_name: str, dataset: str, path: str | Path, *, data_root: Optional[str] = None,
             epochs: int = 10, batch_size: int = 64, lr: float = 0.05, image_size: int = 32,
             seed: int = 0, train_limit: Optional[int] = None, threads: Optional[int] = None,
             progress: bool = True, command: Optional[str] = None) -> dict[str, Any]:
    """Train every layer of ``model_name`` from scratch on ``dataset`` (SGD momentum 0.9, weight
    decay 5e-4, cosine schedule, flips) and save its ``state_dict`` at ``path``; a JSON record
    (accuracy per epoch, command) goes next to it as ``<path>.json``. Returns the record."""
    from .loop import EpochProgress

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        data = load_finetune_data(dataset, data_root, image_size=image_size, train_limit=train_limit)
        torch.manual_seed(seed)
        model, _ = build_backbone(model_name, data.n_classes, None)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        history = []
        started = time.perf_counter()
        for epoch in range(epochs):
            batches, flips = batch_order(data.train_x.shape[0], batch_size, seed, epoch)
            bar = EpochProgress(f"pretrain {model_name} on {dataset} epoch {epoch + 1}/{epochs}",
                                len(batches), progress)
            model.train()
            losses = []
            for idx in batches:
                x = model_input(data.train_x[idx], image_size, flips[idx])
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), data.train_y[idx])
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                bar.update(losses[-1])
            schedule.step()
            accuracy = evaluate(model, data.test_x, data.test_y, image_size, torch.device("cpu"))
            history.append({"epoch": epoch + 1, "train_loss": statistics.fmean(losses),
                            "test_accuracy": accuracy})
            bar.close(f"loss {history[-1]['train_loss']:.4f}, test accuracy {accuracy:.2f}%")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        record = {"command": command, "model": model_name, "dataset": dataset, "data": data.info,
                  "epochs": epochs, "batch_size": batch_size, "lr": lr, "image_size": image_size,
                  "seed": seed, "history": history, "elapsed_s": time.perf_counter() - started,
                  "machine": machine_info(), "state_dict": str(path)}
        path.with_name(path.name + ".json").write_text(json.dumps(record, indent=1) + "\n",
                                                       encoding="utf-8")
        return record
    finally:
        torch.set_num_threads(old_threads)
