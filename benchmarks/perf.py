"""Performance suite behind ``lance-cl bench``: every compression method against vanilla autograd.

For each model (GPM's AlexNet-5, a MobileNetV2-style stack) on real FashionMNIST images padded to
32x32x3, and each method (vanilla, lance, asi, hosvd, gradient_filter), in one process and on the
same weights and the same batch:

* activation memory of one training step, measured with saved-tensor hooks
  (:func:`lance_cl.measure_activation_memory`): over the compressed layers (``selected``) and for
  the whole step (``total``: BatchNorm, ReLU, pooling, dropout included), with vanilla / method
  ratios; the analytic bytes from the ranks are reported next to the measured ones;
* peak memory of that step (``peak_step``, same pass): the most bytes allocated at once during
  forward + backward above the step's start (activations, gradients incl. the parameters'
  ``.grad``, every temporary of the compression code), from the PyTorch profiler's allocation
  events on CPU and the allocator statistics on CUDA, with the vanilla / method ratio;
* step time (zero_grad, forward, loss, backward): median over repeats after warm-up, methods
  interleaved round-robin so slow drift of the machine hits every method alike;
* gradient fidelity: cosine and angle between each compressed layer's weight gradient and plain
  autograd's on the same batch and weights (dropout off, BatchNorm on batch statistics);
* the ranks chosen and the analytic FLOPs of one step over the compressed layers
  (:func:`lance_cl.layer_flops`).

Protocol (documented in docs/performance.md):

* weights are "trained-ish": the plain model is trained for a few dozen SGD steps (lr 0.01, batch
  ``batch_size``, seed fixed) on real images before anything is measured, then deep-copied for
  every method;
* layers compressed: AlexNet-5 -> conv1, conv2, conv3, fc1, fc2 (every trained layer but the task
  head); MobileNetV2Blocks -> every conv of the inverted-residual blocks (1x1 expand, 3x3
  depthwise, 1x1 project), not the stem (its input is the data batch, which a training loop holds
  anyway) nor the classifier head. gradient_filter is defined for Conv2d only, so it compresses
  the convolutions of that set and its ratios are taken against vanilla over the same convs;
* the images are split into disjoint slices: the measured batch (the last ``batch_size`` images),
  the calibration batches just before it (lance: 8 batches, asi: 1), and the training images
  (the rest, cycled).

Usage: ``lance-cl bench [--quick] [--out DIR] ...`` or :func:`run_bench` from Python.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import lance_cl
from lance_cl.data import MEAN_STD, DatasetNotFoundError, default_data_root, expected_files
from lance_cl.data import load_mnist_like, to_32x32x3
from lance_cl.models import AlexNet5, MobileNetV2Blocks
from lance_cl.compact import stem_segments
from lance_cl.wrap import compressed_layers

__all__ = ["BenchConfig", "BenchDataError", "BenchSetupError", "MODELS", "METHODS", "BASE_METHODS", "DEFAULT_METHODS", "COMPACT_VARIANTS", "split_variant", "add_arguments", "config_from_args",
           "failures", "load_bench_data", "main", "render_markdown", "run_bench", "write_outputs"]

BASE_METHODS: tuple[str, ...] = ("vanilla", "lance", "asi", "hosvd", "gradient_filter")
# "+compact": the ops between the weight layers save compact tensors too (exact gradients, stem
# recomputed); "+compact_nostem": the same with the stem stored; "+compact_bf16" / "+compact_int8":
# BatchNorm's normalised input in reduced precision. suffix -> (BatchNorm storage, recompute stem)
COMPACT_VARIANTS: dict[str, tuple[str, bool]] = {
    "+compact": ("float", True), "+compact_nostem": ("float", False),
    "+compact_bf16": ("bf16", True), "+compact_int8": ("int8", True)}
METHODS: tuple[str, ...] = BASE_METHODS + tuple(
    m + v for m in ("vanilla", "lance") for v in COMPACT_VARIANTS) + tuple(
    m + "+compact" for m in ("asi", "hosvd", "gradient_filter"))
DEFAULT_METHODS: tuple[str, ...] = ("vanilla", "vanilla+compact", "vanilla+compact_bf16", "lance",
                                    "lance+compact", "lance+compact_bf16", "asi", "hosvd",
                                    "gradient_filter")


def split_variant(name: str) -> tuple[str, Optional[tuple[str, bool]]]:
    """'lance+compact_bf16' -> ('lance', ('bf16', True)); 'asi' -> ('asi', None)."""
    for suffix in sorted(COMPACT_VARIANTS, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)], COMPACT_VARIANTS[suffix]
    return name, None
MODELS: tuple[str, ...] = ("alexnet", "mobilenet")


class BenchDataError(DatasetNotFoundError):
    """FashionMNIST is not on disk where the bench looks for it."""


class BenchSetupError(RuntimeError):
    """The bench cannot run as configured (e.g. ``--device cuda`` without a CUDA device)."""


@dataclass
class BenchConfig:
    """Everything that decides what the bench measures (all of it is written into the JSON)."""

    models: tuple[str, ...] = MODELS
    methods: tuple[str, ...] = DEFAULT_METHODS
    batch_size: int = 64
    repeats: int = 31            # timed steps per method (median reported)
    warmup: int = 3              # untimed steps per method before timing
    train_steps: int = 48        # SGD steps of the vanilla model before measuring
    lr: float = 0.01
    eps: float = 0.7             # lance / asi / hosvd energy threshold
    radius: int = 2              # gradient_filter patch side R
    lance_calibration_batches: int = 8
    asi_calibration_batches: int = 1
    threads: Optional[int] = None  # None: leave torch's default
    device: str = "cpu"
    data_root: Optional[str] = None
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_preset(cls, **overrides: Any) -> "BenchConfig":
        """Fewer repeats and training steps: under a minute on 2 CPU cores."""
        base = dict(repeats=5, warmup=1, train_steps=12, quick=True)
        base.update(overrides)
        return cls(**base)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def load_bench_data(data_root: Optional[str | Path] = None, limit: Optional[int] = None
                    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Real FashionMNIST as (N, 3, 32, 32) float32 normalised images and int64 labels.

    Uses the train split when present, else the test (t10k) split; only the first ``limit`` images
    are converted (the bench needs a few thousand). Raises :class:`BenchDataError` naming every
    file looked for and ``--data-root`` when neither split is on disk.
    """
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    for train in (True, False):
        try:
            images, labels = load_mnist_like("fashion_mnist", root, train=train)
        except DatasetNotFoundError:
            continue
        available = int(images.shape[0])
        if limit is not None:
            images, labels = images[:limit], labels[:limit].clone()
        x = to_32x32x3(images, *MEAN_STD["fashion_mnist"])
        info = {"dataset": "FashionMNIST", "split": "train" if train else "test (t10k)",
                "root": str(root), "n_images_in_split": available, "n_images_used": int(x.shape[0]),
                "preprocessing": "28x28 zero-padded to 32x32, normalised with the FashionMNIST "
                                 "mean/std, grey repeated to 3 channels"}
        return x, labels, info
    lines = []
    for train in (True, False):
        for p in expected_files("fashion_mnist", root, train):
            lines.append(f"  {p}[.gz]")
    raise BenchDataError(
        f"lance-cl bench measures on real FashionMNIST images, but none were found under {root}.\n"
        "Expected (plain or .gz; the train split is used when present, else the test split):\n"
        + "\n".join(lines) + "\n"
        "Pass --data-root DIR (the folder that contains FashionMNIST/raw/), or set LANCE_CL_DATA. "
        "The files come from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ or "
        "torchvision.datasets.FashionMNIST(DIR, download=True)."
    )


@dataclass
class _Split:
    train_x: Tensor
    train_y: Tensor
    calib: list[tuple[Tensor, Tensor]]
    measure: tuple[Tensor, Tensor]


def _split(x: Tensor, y: Tensor, batch_size: int, n_calib: int) -> _Split:
    """Disjoint slices: measured batch = last ``batch_size`` images, calibration batches before it,
    training images = the rest."""
    need = batch_size * (n_calib + 2)
    if x.shape[0] < need:
        raise BenchSetupError(f"the bench needs at least {need} images for batch size {batch_size} "
                         f"({n_calib} calibration batches, 1 measured batch, 1+ training batch); "
                         f"got {x.shape[0]}")
    n = x.shape[0]
    m0 = n - batch_size
    c0 = m0 - n_calib * batch_size
    # clones: a batch that is a slice of the data set would keep (and be accounted as) all of it
    calib = [(x[c0 + i * batch_size: c0 + (i + 1) * batch_size].clone(),
              y[c0 + i * batch_size: c0 + (i + 1) * batch_size].clone()) for i in range(n_calib)]
    return _Split(train_x=x[:c0], train_y=y[:c0], calib=calib,
                  measure=(x[m0:].clone(), y[m0:].clone()))


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def _build_model(name: str) -> tuple[nn.Module, str]:
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


def _method_layers(method: str, model: nn.Module, body: Sequence[str]) -> list[str]:
    method = split_variant(method)[0]
    if method == "gradient_filter":
        named = dict(model.named_modules())
        return [n for n in body if isinstance(named[n], nn.Conv2d)]
    return list(body)


def _method_options(method: str, cfg: BenchConfig) -> dict[str, Any]:
    method = split_variant(method)[0]
    if method in ("lance", "asi", "hosvd"):
        return {"eps": cfg.eps}
    if method == "gradient_filter":
        return {"radius": cfg.radius}
    return {}


def _set_fidelity_mode(model: nn.Module) -> None:
    """Training-mode BatchNorm (batch statistics) but no dropout: a deterministic training step."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """One timed training step without the optimizer: zero_grad, forward, loss, backward."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()


def _weight_grads(model: nn.Module, names: Sequence[str], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    _set_fidelity_mode(model)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    out = {n: model.get_submodule(n).weight.grad.detach().to(torch.float64).flatten().cpu()
           for n in names}
    model.zero_grad(set_to_none=True)
    model.train()
    return out


def _cosine(a: Tensor, b: Tensor) -> dict[str, float]:
    """Cosine and angle in degrees, in float64. Identical vectors give exactly 1 and 0."""
    dot = float(a @ b)
    aa, bb = float(a @ a), float(b @ b)
    if aa == 0.0 or bb == 0.0:
        cos = 1.0 if aa == bb else 0.0
    else:
        cos = max(-1.0, min(1.0, dot / math.sqrt(aa * bb)))
    rel = math.sqrt(max(aa - 2 * dot + bb, 0.0) / bb) if bb > 0 else 0.0
    return {"cosine": cos, "angle_deg": math.degrees(math.acos(cos)), "rel_error": rel}


def _analytic_bytes(row: dict[str, Any], element_size: int) -> Optional[int]:
    """Bytes one layer should save per step, from its report row: the core (compressed modes at
    their rank) plus each factor n_m x r_m; vanilla = the input; gradient_filter = the report's."""
    shape = row.get("input_shape")
    if shape is None:
        return None
    if row["method"] == "vanilla":
        return math.prod(shape) * element_size
    if row["method"] == "gradient_filter":
        return row["bytes_after"]
    ranks = list(row["ranks"])
    core = math.prod(n if r is None else r for n, r in zip(shape, ranks))
    factors = sum(n * r for n, r in zip(shape, ranks) if r is not None)
    return (core + factors) * element_size


def _factor_storage(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per layer: bytes of the stored factors' elements vs the bytes of the storages they keep
    alive (a truncated view keeps its whole base; SPEC 9)."""
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


# ------------------------------------------------------------------------------------------------
# the bench
# ------------------------------------------------------------------------------------------------
def _train(model: nn.Module, split: _Split, cfg: BenchConfig, device: torch.device,
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
    names = _method_layers(method, model, body)
    plain_method, variant = split_variant(method)
    compact = None if variant is None else {
        "batch_norm": variant[0], "recompute": stem_segments(model) if variant[1] else ()}
    lance_cl.compress(model, plain_method, names, **_method_options(method, cfg))
    calibration = {"lance": cfg.lance_calibration_batches,
                   "asi": cfg.asi_calibration_batches}.get(plain_method)
    if calibration is not None:
        lance_cl.calibrate(model, calib[:calibration], progress=False)
    if compact is not None:
        lance_cl.compact_activations(model, **compact)
    # fidelity first: for asi this is the first iteration away from the calibration batch
    grads = _weight_grads(model, names, x, y)
    per_layer_fid = {n: _cosine(grads[n], ref_grads[n]) for n in names}
    overall = _cosine(torch.cat([grads[n] for n in names]), torch.cat([ref_grads[n] for n in names]))
    # memory of a real training step (dropout on)
    model.train()
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    mem = lance_cl.measure_activation_memory(model, x, loss_fn, layers=names)
    model.zero_grad(set_to_none=True)
    key = tuple(names)
    if method == "vanilla":
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
    element = next(model.parameters()).element_size()
    analytic = {r["name"]: _analytic_bytes(r, element) for r in rows}
    layers_by_name = compressed_layers(model)
    flops = {n: lance_cl.layer_flops(layers_by_name[n]) for n in names}
    flops_total = sum(f["total"] for f in flops.values())
    flops_vanilla = sum(f["vanilla_total"] for f in flops.values())
    result = {
        "layers": names,
        "options": _method_options(method, cfg),
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


def _bench_model(model_name: str, split: _Split, cfg: BenchConfig, device: torch.device,
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
    ref_grads = _weight_grads(reference, body, x, y)
    del reference

    methods = ["vanilla"] + [m for m in cfg.methods if m != "vanilla"]
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
                method, base, body, cfg, calib, x, y, ref_grads, models.get("vanilla"), vanilla_mem)
        except Exception as e:  # a method that breaks is reported, the others still run
            if method == "vanilla":
                raise
            results[method] = {"layers": _method_layers(method, base, body),
                               "options": _method_options(method, cfg),
                               "error": f"{type(e).__name__}: {e}"}
            print(f"lance-cl bench: {model_name} / {method} failed: {type(e).__name__}: {e}",
                  file=sys.stderr)
        phases[f"setup_{method}"] = time.perf_counter() - t0
        if bar is not None:
            bar.update(1)

    t0 = time.perf_counter()
    samples = _time_methods(models, x, y, cfg, device, bar, model_name)
    phases["timing"] = time.perf_counter() - t0
    base_time = statistics.median(samples["vanilla"])
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
    for m in config.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchSetupError("--device cuda was asked for but torch sees no CUDA device "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    n_calib = max(config.lance_calibration_batches, config.asi_calibration_batches)
    needed = config.batch_size * (max(config.train_steps, 1) + n_calib + 1)
    x, y, data_info = load_bench_data(config.data_root, limit=needed)
    split = _split(x, y, config.batch_size, n_calib)
    data_info.update(measured_batch=f"last {config.batch_size} of the images used",
                     calibration=f"the {n_calib} batches before the measured batch",
                     training="the images before the calibration batches (cycled, seeded order)")
    old_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(int(config.threads))
    started = time.perf_counter()
    try:
        machine = _machine_info(device)
        n_methods = 1 + len([m for m in config.methods if m != "vanilla"])
        total = len(config.models) * (config.train_steps + n_methods + config.repeats)
        with tqdm(total=total, desc="bench", disable=not progress, leave=False) as bar:
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


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_ratio(r: Optional[float], digits: int = 2) -> str:
    if r is None:
        return "-"
    if r >= 100:
        return f"{r:.0f}x"
    return f"{r:.{digits}f}x"


def _fmt_ranks(ranks: Sequence[Optional[int]]) -> str:
    if not ranks or all(r is None for r in ranks):
        return "-"
    return ",".join("-" if r is None else str(r) for r in ranks)


def render_markdown(result: dict[str, Any], details: bool = True) -> str:
    """Summary table (one row per model and method); with ``details`` also per-layer tables."""
    lines = []
    m = result["machine"]
    cfg = result["config"]
    lines.append(f"Machine: {m['cpu_model']}, {m['cpu_usable']} usable cores, torch {m['torch']}, "
                 f"{m['torch_threads']} threads, device {m['device']}"
                 + (f" ({m['gpu']})" if "gpu" in m else "")
                 + (f"; load average {m['load_average_1_5_15min'][0]:.2f} at start, "
                    f"{m['load_average_at_end'][0]:.2f} at end"
                    if m.get("load_average_1_5_15min") and m.get("load_average_at_end") else ""))
    lines.append(f"Data: {result['data']['dataset']} {result['data']['split']}, batch {cfg['batch_size']}; "
                 f"{cfg['repeats']} timed steps per method (median), {cfg['warmup']} warm-up; "
                 f"weights after {cfg['train_steps']} SGD steps (lr {cfg['lr']}).")
    lines.append("")
    lines.append("Memory ratios are vanilla / method (higher = fewer bytes); time and FLOPs ratios are "
                 "method / vanilla (lower = faster). \"compressed layers\" = bytes autograd saves for the "
                 "compressed layers; \"whole step\" = every tensor saved in the step; \"peak step\" = "
                 "the most bytes allocated at once during forward + backward (gradients and "
                 "temporaries included) above the step's start.")
    lines.append("")
    head = ("| model | method | layers | act. bytes, compressed layers (analytic) | ratio "
            "| act. bytes, whole step | ratio | peak step mem. | ratio | step time (ms) | time ratio "
            "| FLOPs ratio | grad cosine | grad angle |")
    lines.append(head)
    lines.append("|" + "---|" * 14)
    for model_name, res in result["results"].items():
        for method, r in res["methods"].items():
            if "error" in r:
                lines.append(f"| {model_name} | {method} | {len(r['layers'])} | failed: "
                             f"{_md_escape(r['error'])} |" + " |" * 10)
                continue
            mem, t, fid, fl = r["memory"], r["time"], r["fidelity"]["overall"], r["flops"]
            lines.append(
                f"| {model_name} | {method} | {len(r['layers'])} | {_fmt_bytes(mem['selected'])} "
                f"({_fmt_bytes(mem['analytic_selected'])}) "
                f"| {_fmt_ratio(mem['selected_ratio'], 1)} | {_fmt_bytes(mem['total'])} "
                f"| {_fmt_ratio(mem['total_ratio'])} | {_fmt_bytes(mem.get('peak_step'))} "
                f"| {_fmt_ratio(mem.get('peak_step_ratio'))} | {t['median_s'] * 1e3:.1f} | {t['ratio']:.2f}x "
                f"| {fl['ratio']:.3f}x | {fid['cosine']:.4f} | {fid['angle_deg']:.1f} deg |")
    if not details:
        return "\n".join(lines) + "\n"
    for model_name, res in result["results"].items():
        lines.append("")
        lines.append(f"### {model_name}: per layer ({res['model']})")
        lines.append("")
        tr = res["training"]
        if tr["loss_first5_mean"] is not None:
            lines.append(f"Training before measuring: {tr['steps']} SGD steps, loss "
                         f"{tr['loss_first5_mean']:.3f} (first 5) -> {tr['loss_last5_mean']:.3f} (last 5).")
            lines.append("")
        lines.append("| layer | input | method | ranks | measured bytes | analytic bytes | vs vanilla "
                     "| grad cosine | grad angle | FLOPs ratio |")
        lines.append("|" + "---|" * 10)
        van = res["methods"]["vanilla"]["memory"]["per_layer_measured"]
        for method, r in res["methods"].items():
            if "error" in r:
                continue
            shapes = {row["name"]: row["input_shape"] for row in r["report"]}
            for name in r["layers"]:
                meas = r["memory"]["per_layer_measured"][name]
                ana = r["memory"]["per_layer_analytic"].get(name)
                fid = r["fidelity"]["per_layer"][name]
                fl = r["flops"]["per_layer"][name]
                shape = "x".join(map(str, shapes.get(name) or ())) or "?"
                lines.append(
                    f"| {name} | {shape} | {method} | {_fmt_ranks(r['ranks'].get(name, ()))} "
                    f"| {_fmt_bytes(meas)} | {_fmt_bytes(ana)} | {_fmt_ratio(van[name] / meas if meas else None, 1)} "
                    f"| {fid['cosine']:.4f} | {fid['angle_deg']:.1f} | {fl['total'] / fl['vanilla_total']:.3f}x |")
    return "\n".join(lines) + "\n"


def _md_escape(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failures(result: dict[str, Any]) -> list[str]:
    """"model / method: error" for every method that could not be measured."""
    return [f"{model} / {method}: {r['error']}" for model, res in result["results"].items()
            for method, r in res["methods"].items() if "error" in r]


def write_outputs(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``bench.json`` and ``bench.md`` into ``out`` (created); returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "bench.json", out / "bench.md"
    json_path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(result, details=True), encoding="utf-8")
    return json_path, md_path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Size):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ------------------------------------------------------------------------------------------------
# command line (used by lance_cl.cli)
# ------------------------------------------------------------------------------------------------
def _csv(kind: str, allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(bad) or '(none given)'}; choose from {', '.join(allowed)}")
        return items
    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and training steps (under a minute on 2 CPU cores)")
    parser.add_argument("--out", default="bench_out", help="output folder for bench.json and bench.md "
                        "(default: bench_out/)")
    parser.add_argument("--data-root", default=None,
                        help="folder containing FashionMNIST/raw/ (default: $LANCE_CL_DATA, the "
                             "checkout's ../shared/data, or ~/.lance_cl/data)")
    parser.add_argument("--batch-size", type=_positive, default=64, help="batch size (default 64)")
    parser.add_argument("--repeats", type=_positive, default=None,
                        help="timed steps per method (default 31, quick 5)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per method before timing (default 3, quick 1)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="SGD steps of the vanilla model before measuring (default 48, quick 12)")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="torch.set_num_threads (default: torch's default, all available cores)")
    parser.add_argument("--models", type=_csv("model", MODELS), default=MODELS,
                        help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--methods", type=_csv("method", METHODS), default=DEFAULT_METHODS,
                        help=f"comma-separated list from {','.join(METHODS)} (vanilla always runs; "
                             f"default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the training order")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    overrides: dict[str, Any] = dict(
        models=tuple(args.models), methods=tuple(args.methods), batch_size=args.batch_size,
        threads=args.threads, device=args.device, data_root=args.data_root, seed=args.seed)
    for key in ("repeats", "warmup", "train_steps"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    return BenchConfig.quick_preset(**overrides) if args.quick else BenchConfig(**overrides)


def main(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    """Run the bench from parsed arguments; print the summary table. Returns the exit status."""
    cfg = config_from_args(args)
    command = "lance-cl " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        result = run_bench(cfg, progress=True, command=command)
    except (BenchDataError, BenchSetupError) as e:
        print(f"lance-cl bench: {e}", file=sys.stderr)
        return 1
    json_path, md_path = write_outputs(result, args.out)
    print(render_markdown(result, details=False))
    print(f"wrote {json_path} and {md_path} ({result['elapsed_s']:.0f} s)")
    failed = failures(result)
    if failed:
        print("lance-cl bench: some methods could not be measured:\n  " + "\n  ".join(failed),
              file=sys.stderr)
        return 1
    return 0
