"""The bench's measurements: train the plain model briefly, then for every method compress a
copy, calibrate it and measure gradient fidelity, activation and peak memory, analytic FLOPs and
step time on the same batch and weights (protocol: :mod:`lance_cl.benchmarks.perf` and
docs/performance.md)."""
from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import lance_cl
from lance_cl.compact import default_recompute
from lance_cl.progress import progress_bar
from lance_cl.train_modes import preserved_train_modes
from lance_cl.wrap import compressed_layers

from .perf_config import (MODELS, REFERENCE, BenchConfig, BenchSetupError, bench_methods,
                          calibration_batches, max_calibration_batches, method_layers,
                          method_options, split_variant)
from .perf_data import BenchSplit, load_bench_data, split_images


def _build_model(name: str) -> tuple[nn.Module, str]:
    from lance_cl.models import AlexNet5, MobileNetV2Blocks   # the model zoo loads only here

    if name == "alexnet":
        return AlexNet5(n_tasks=1, n_classes=10, in_channels=3, dropout=True), \
            "AlexNet5(n_tasks=1, n_classes=10, in_channels=3, dropout=True)"
    if name == "mobilenet":
        return MobileNetV2Blocks(in_channels=3, n_classes=10), \
            "MobileNetV2Blocks(in_channels=3, n_classes=10)"
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def _body_layers(name: str, model: nn.Module) -> list[str]:
    """The layers every method compresses (see the module docstring for the choice)."""
    kinds = (nn.Conv2d, nn.Linear)
    if name == "alexnet":
        return [n for n, m in model.named_modules() if isinstance(m, kinds) and not n.startswith("heads")]
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and n.startswith("blocks.")]


def _set_fidelity_mode(model: nn.Module) -> None:
    """Training-mode BatchNorm (batch statistics) but no dropout: a deterministic training step."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """One timed training step without the optimizer: zero_grad, forward, loss, backward."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()


def weight_grads(model: nn.Module, names: Sequence[str], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Flattened float64 weight gradient of each layer in ``names`` for one deterministic
    cross-entropy step (BatchNorm on batch statistics, dropout off); train modes as before."""
    with preserved_train_modes(model):
        _set_fidelity_mode(model)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        out = {n: model.get_submodule(n).weight.grad.detach().to(torch.float64).flatten().cpu()
               for n in names}
        model.zero_grad(set_to_none=True)
    return out


def cosine_fidelity(a: Tensor, b: Tensor) -> dict[str, float]:
    """Cosine and angle in degrees between gradients ``a`` and reference ``b`` (1-D, float64),
    and the relative error ||a - b|| / ||b||. Identical vectors give exactly 1 and 0."""
    dot = float(a @ b)
    aa, bb = float(a @ a), float(b @ b)
    if aa == 0.0 or bb == 0.0:
        cos = 1.0 if aa == bb else 0.0
    else:
        cos = max(-1.0, min(1.0, dot / math.sqrt(aa * bb)))
    rel = math.sqrt(max(aa - 2 * dot + bb, 0.0) / bb) if bb > 0 else 0.0
    return {"cosine": cos, "angle_deg": math.degrees(math.acos(cos)), "rel_error": rel}


def _factor_storage(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per layer: bytes of the stored factors' elements vs the bytes of the storages they keep
    alive (a truncated view keeps its whole base)."""
    out = {}
    for name, layer in compressed_layers(model).items():
        comp = layer.compressor
        if not comp.uses_factors:
            continue
        needed = held = 0
        for u in comp.factors():
            if u is not None:
                needed += u.numel() * u.element_size()
                held += u.untyped_storage().nbytes()
        out[name] = {"needed": needed, "held": held}
    return out


def _machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lance_cl": lance_cl.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info



def _train(model: nn.Module, split: BenchSplit, cfg: BenchConfig, device: torch.device,
           bar: Optional[tqdm]) -> dict[str, Any]:
    """A few dozen plain SGD steps so activations look like a network's, not like noise."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    model.train()
    n = split.train_x.shape[0]
    order = torch.randperm(n, generator=gen)
    pos, losses = 0, []
    for _ in range(cfg.train_steps):
        if pos + cfg.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos: pos + min(cfg.batch_size, n)]
        pos += cfg.batch_size
        x, y = split.train_x[idx].to(device), split.train_y[idx].to(device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
    opt.zero_grad(set_to_none=True)
    head = losses[: min(5, len(losses))]
    tail = losses[-min(5, len(losses)):]
    return {"steps": cfg.train_steps, "lr": cfg.lr, "batch_size": cfg.batch_size, "optimizer": "SGD",
            "loss_first5_mean": statistics.fmean(head) if head else None,
            "loss_last5_mean": statistics.fmean(tail) if tail else None}


def _setup_method(method: str, base: nn.Module, body: Sequence[str], cfg: BenchConfig,
                  calib: list[tuple[Tensor, Tensor]], x: Tensor, y: Tensor,
                  ref_grads: dict[str, Tensor], vanilla: Optional[nn.Module],
                  vanilla_mem: dict[tuple[str, ...], dict[str, Any]]) -> tuple[nn.Module, dict[str, Any]]:
    """Compress a copy of ``base`` with ``method``, calibrate it, and measure fidelity, memory,
    ranks and FLOPs on the measured batch. Returns the model (kept for timing) and its results."""
    model = copy.deepcopy(base)
    names = method_layers(method, model, body)
    plain_method, variant = split_variant(method)
    compact = None if variant is None else {
        "batch_norm": variant[0], "recompute": default_recompute(model) if variant[1] else (),
        "segment_tail": variant[2]}
    lance_cl.compress(model, plain_method, names, **method_options(method, cfg))
    calibration = calibration_batches(method, cfg)
    if calibration is not None:
        lance_cl.calibrate(model, calib[:calibration], progress=False)
    if compact is not None:
        lance_cl.compact_activations(model, **compact)
    # fidelity first: for asi this is the first iteration away from the calibration batch
    grads = weight_grads(model, names, x, y)
    per_layer_fid = {n: cosine_fidelity(grads[n], ref_grads[n]) for n in names}
    overall = cosine_fidelity(torch.cat([grads[n] for n in names]), torch.cat([ref_grads[n] for n in names]))
    # memory of a real training step (dropout on)
    model.train()
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    mem = lance_cl.measure_activation_memory(model, x, loss_fn, layers=names)
    model.zero_grad(set_to_none=True)
    key = tuple(names)
    if method == REFERENCE:
        vanilla_mem[key] = mem
    elif key not in vanilla_mem:
        assert vanilla is not None
        vanilla_mem[key] = lance_cl.measure_activation_memory(vanilla, x, loss_fn, layers=names)
        vanilla.zero_grad(set_to_none=True)
    van = vanilla_mem[key]
    named = dict(model.named_modules())
    per_type: dict[str, int] = {}
    for name, nbytes in mem["per_layer"].items():
        module = named.get(name)
        kind = "(model code)" if not name or module is None else \
            getattr(module, "plain_type", type(module)).__name__
        per_type[kind] = per_type.get(kind, 0) + nbytes
    rows = lance_cl.report(model).to_dicts()
    # analytic bytes per layer: what its method says it saves for the measured input
    analytic = {r["name"]: r["bytes_after"] for r in rows}
    layers_by_name = compressed_layers(model)
    flops = {n: lance_cl.layer_flops(layers_by_name[n]) for n in names}
    flops_total = sum(f["total"] for f in flops.values())
    flops_vanilla = sum(f["vanilla_total"] for f in flops.values())
    result = {
        "layers": names,
        "options": method_options(method, cfg),
        "compaction": None if compact is None else {**compact, "recompute": list(compact["recompute"])},
        "calibration_batches": calibration,
        "memory": {
            "selected": mem["selected"], "total": mem["total"],
            "vanilla_selected": van["selected"], "vanilla_total": van["total"],
            "selected_ratio": van["selected"] / mem["selected"] if mem["selected"] else None,
            "total_ratio": van["total"] / mem["total"] if mem["total"] else None,
            "analytic_selected": sum(v for v in analytic.values() if v is not None),
            "per_layer_measured": {n: mem["per_layer"].get(n, 0) for n in names},
            "per_layer_analytic": analytic,
            # whole step by module type; a storage saved by two modules counts for both
            "per_module_type": per_type,
            "factor_storage": _factor_storage(model),
            "cuda_peak": mem["cuda_peak"],
            "peak_step": mem["peak_bytes"], "vanilla_peak_step": van["peak_bytes"],
            "peak_step_ratio": van["peak_bytes"] / mem["peak_bytes"]
            if mem["peak_bytes"] and van["peak_bytes"] is not None else None,
        },
        "fidelity": {"overall": overall, "per_layer": per_layer_fid},
        "flops": {"total": flops_total, "vanilla_total": flops_vanilla,
                  "ratio": flops_total / flops_vanilla if flops_vanilla else None,
                  "compression": sum(f["compression"] for f in flops.values()),
                  "per_layer": flops},
        "report": rows,
        # ranks of the measured step (hosvd: that step's own decomposition; asi: after one
        # iteration on the measured batch)
        "ranks": {r["name"]: r["ranks"] for r in rows},
    }
    return model, result


def _time_methods(models: dict[str, nn.Module], x: Tensor, y: Tensor, cfg: BenchConfig,
                  device: torch.device, bar: Optional[tqdm], label: str) -> dict[str, list[float]]:
    """Warm-up, then one step per method per repeat, round-robin with a rotating start."""
    methods = list(models)
    for model in models.values():
        model.train()
    if bar is not None:
        bar.set_description(f"{label}: warm-up")
    for model in models.values():
        for _ in range(cfg.warmup):
            _step(model, x, y)
    _sync(device)
    samples: dict[str, list[float]] = {m: [] for m in methods}
    if bar is not None:
        bar.set_description(f"{label}: timing")
    for rep in range(cfg.repeats):
        k = rep % len(methods)
        for method in methods[k:] + methods[:k]:
            model = models[method]
            _sync(device)
            t0 = time.perf_counter()
            _step(model, x, y)
            _sync(device)
            samples[method].append(time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
    for model in models.values():
        model.zero_grad(set_to_none=True)
    return samples


def _bench_model(model_name: str, split: BenchSplit, cfg: BenchConfig, device: torch.device,
                 bar: Optional[tqdm]) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    base, description = _build_model(model_name)
    base.to(device)
    body = _body_layers(model_name, base)
    if bar is not None:
        bar.set_description(f"{model_name}: training")
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    training = _train(base, split, cfg, device, bar)
    phases["training"] = time.perf_counter() - t0
    x, y = (t.to(device) for t in split.measure)

    # reference gradients: plain autograd on an untouched copy
    reference = copy.deepcopy(base)
    ref_grads = weight_grads(reference, body, x, y)
    del reference

    methods = [REFERENCE] + [m for m in cfg.methods if m != REFERENCE]
    models: dict[str, nn.Module] = {}
    results: dict[str, dict[str, Any]] = {}
    vanilla_mem: dict[tuple[str, ...], dict[str, Any]] = {}
    calib = [(cx.to(device), cy.to(device)) for cx, cy in split.calib]
    for method in methods:
        if bar is not None:
            bar.set_description(f"{model_name}: {method} set-up")
        t0 = time.perf_counter()
        try:
            models[method], results[method] = _setup_method(
                method, base, body, cfg, calib, x, y, ref_grads, models.get(REFERENCE), vanilla_mem)
        except Exception as e:  # a method that breaks is reported, the others still run
            if method == REFERENCE:
                raise
            results[method] = {"layers": method_layers(method, base, body),
                               "options": method_options(method, cfg),
                               "error": f"{type(e).__name__}: {e}"}
            print(f"lance-cl bench: {model_name} / {method} failed: {type(e).__name__}: {e}",
                  file=sys.stderr)
        phases[f"setup_{method}"] = time.perf_counter() - t0
        if bar is not None:
            bar.update(1)

    t0 = time.perf_counter()
    samples = _time_methods(models, x, y, cfg, device, bar, model_name)
    phases["timing"] = time.perf_counter() - t0
    base_time = statistics.median(samples[REFERENCE])
    for method, times in samples.items():
        med = statistics.median(times)
        results[method]["time"] = {"median_s": med, "ratio": med / base_time,
                                   "min_s": min(times), "samples_s": times}
    return {"model": description, "compressed_layers": body, "training": training,
            "methods": results, "phase_seconds": phases}


def run_bench(config: BenchConfig, *, progress: bool = True, command: Optional[str] = None) -> dict[str, Any]:
    """Run the suite and return the result dictionary (what ``bench.json`` holds)."""
    for m in config.models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    known = bench_methods()
    for m in config.methods:
        if m not in known:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(known)}")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchSetupError("--device cuda was asked for but torch sees no CUDA device "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    n_calib = max_calibration_batches(config)
    needed = config.batch_size * (max(config.train_steps, 1) + n_calib + 1)
    x, y, data_info = load_bench_data(config.data_root, limit=needed)
    split = split_images(x, y, config.batch_size, n_calib)
    data_info.update(measured_batch=f"last {config.batch_size} of the images used",
                     calibration=f"the {n_calib} batches before the measured batch",
                     training="the images before the calibration batches (cycled, seeded order)")
    old_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(int(config.threads))
    started = time.perf_counter()
    try:
        machine = _machine_info(device)
        n_methods = 1 + len([m for m in config.methods if m != REFERENCE])
        total = len(config.models) * (config.train_steps + n_methods + config.repeats)
        with progress_bar(total=total, desc="bench", disable=not progress, leave=False) as bar:
            results = {m: _bench_model(m, split, config, device, bar if progress else None)
                       for m in config.models}
    finally:
        torch.set_num_threads(old_threads)
    machine["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "command": command,
        "config": asdict(config),
        "machine": machine,
        "data": data_info,
        "elapsed_s": time.perf_counter() - started,
        "results": results,
    }

