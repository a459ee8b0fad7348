"""One fine-tuning run: a copy of the pretrained backbone, its last layers trained with one method,
the rest frozen; then accuracy, saved-activation bytes, peak step memory, FLOPs, step time,
ranks and the gradient angle per fine-tuned layer.

Frozen means ``requires_grad=False`` and nothing saved for backward: the layers before the first
fine-tuned one build no graph at all, and frozen Conv2d / Linear layers *after* it (they must pass
gradients back) take :mod:`lance_cl.core.frozen`'s path, which keeps only the weight. BatchNorm
runs in eval mode (running statistics), as in ASI's ``set_bn_eval``.
"""
from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lance_cl
from ..train_modes import preserved_train_modes
from ..wrap import compressed_layers, execution_order
from .data import FinetuneData, model_input
from .protocol import FinetuneConfig, method_options

__all__ = ["EpochProgress", "batch_order", "evaluate", "finetuned_layer_names", "freeze_except",
           "gradient_agreement", "interleaved_step_times", "prepare_model", "run_method",
           "set_finetune_mode"]

Batch = tuple[Tensor, Tensor]


def finetuned_layer_names(model: nn.Module, spec: Union[int, str], example: Tensor,
                          plain_head: Optional[str] = None) -> list[str]:
    """The layers a method fine-tunes and compresses. example: one input batch.

    ``spec`` N: the last N layers in execution order; a glob: the Conv2d / Linear layers it
    names. Without ``plain_head`` N counts Conv2d and Linear layers, so the classifier is one of
    them. With ``plain_head`` (the classifier's module name, trained with plain autograd on top,
    as in the ASI and HOSVD_eps code) N counts Conv2d layers only and the head is never listed.
    """
    if isinstance(spec, str) and spec.isdigit():
        spec = int(spec)
    if plain_head is None:
        return lance_cl.select_layers(model, spec, example_inputs=example)
    if isinstance(spec, int):
        named = dict(model.named_modules())
        convs = [n for n in execution_order(model, example)
                 if isinstance(named[n], nn.Conv2d) and n != plain_head]
        if spec < 1 or spec > len(convs):
            raise ValueError(f"layers={spec}: the model has {len(convs)} convolutions before its "
                             f"head {plain_head!r}")
        return convs[-spec:]
    return [n for n in lance_cl.select_layers(model, spec, example_inputs=example) if n != plain_head]


def freeze_except(model: nn.Module, names: Sequence[str]) -> None:
    """requires_grad False for every parameter except the weight and bias of ``names``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        for p in model.get_submodule(name).parameters(recurse=False):
            p.requires_grad_(True)


def set_finetune_mode(model: nn.Module, dropout: bool = True) -> None:
    """Training mode with every BatchNorm in eval mode (and dropout off unless ``dropout``)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
        elif isinstance(m, nn.modules.dropout._DropoutNd) and not dropout:
            m.eval()


def prepare_model(base: nn.Module, method: str, names: Sequence[str], options: dict[str, Any],
                  calibration: Sequence[Batch], example: Tensor,
                  plain_layers: Sequence[str] = ()) -> tuple[nn.Module, list[str]]:
    """A copy of ``base`` with ``names`` trainable and compressed with ``method`` (calibrated on
    ``calibration`` when the method needs it), ``plain_layers`` (a classifier on top) trainable
    with plain autograd, every other parameter frozen.

    gradient_filter applies to Conv2d only: the Linear layers among ``names`` train with plain
    autograd. Returns (model, names compressed with ``method``)."""
    model = copy.deepcopy(base)
    order = execution_order(model, example)
    freeze_except(model, list(names) + list(plain_layers))
    named = dict(model.named_modules())
    compressed = [n for n in names if method != "gradient_filter" or isinstance(named[n], nn.Conv2d)]
    plain = [n for n in names if n not in compressed] + [n for n in plain_layers if n not in names]
    first = min(order.index(n) for n in list(names) + plain)
    # frozen weight layers after the first fine-tuned one pass gradients back: saving only weights
    frozen_after = [n for n in order[first:] if n not in names and n not in plain]
    lance_cl.compress(model, method, compressed, **options)
    if plain or frozen_after:
        lance_cl.compress(model, "vanilla", plain + frozen_after)
    if any(l.compressor.needs_calibration for l in compressed_layers(model).values()):
        set_finetune_mode(model)
        lance_cl.calibrate(model, list(calibration), progress=False, batch_norm="running")
    return model, compressed


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> tuple[list[Tensor], Tensor]:
    """Index batches of one epoch (drop_last: full batches only) and a bool flip mask (n,), both
    drawn from (seed, epoch) alone, so every method sees the same data in the same order."""
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    perm = torch.randperm(n, generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    steps = n // batch_size
    if steps == 0:
        raise ValueError(f"{n} training images do not make one batch of {batch_size}; lower "
                         f"--batch-size or raise --train-limit")
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(steps)], flips


def evaluate(model: nn.Module, x: Tensor, y: Tensor, image_size: int, device: torch.device,
             batch_size: int = 256) -> float:
    """Top-1 accuracy in percent. x: uint8 (N, 3, H, W), y: (N,)."""
    correct = 0
    with torch.no_grad(), preserved_train_modes(model):
        model.eval()
        for i in range(0, x.shape[0], batch_size):
            out = model(model_input(x[i:i + batch_size], image_size).to(device))
            correct += int((out.argmax(1).cpu() == y[i:i + batch_size]).sum())
    return 100.0 * correct / max(1, x.shape[0])


class EpochProgress:
    """A tqdm bar per epoch on a terminal; elsewhere one whole line per finished epoch."""

    def __init__(self, desc: str, total: int, enabled: bool = True) -> None:
        self.desc, self.enabled = desc, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from ..progress import progress_bar

            self.bar = progress_bar(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def close(self, summary: str) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            print(f"{self.desc}: {summary}", file=sys.stderr, flush=True)


def _cosine_angle(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Cosine and angle (degrees) between two flattened gradients, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    cos = 1.0 if na == nb == 0.0 else (0.0 if na == 0.0 or nb == 0.0 else float(a @ b) / (na * nb))
    cos = max(-1.0, min(1.0, cos))
    return cos, math.degrees(math.acos(cos))


def _weight_grads(model: nn.Module, names: Sequence[str], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    set_finetune_mode(model, dropout=False)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    grads = {n: model.get_submodule(n).weight.grad.detach().clone() for n in names}
    model.zero_grad(set_to_none=True)
    return grads


def gradient_agreement(model: nn.Module, names: Sequence[str], x: Tensor, y: Tensor) -> dict[str, dict[str, float]]:
    """Per fine-tuned layer: cosine and angle between the method's weight gradient and plain
    autograd's on the same weights and batch (dropout off). x: (B, 3, S, S), y: (B,)."""
    reference = lance_cl.uncompress(copy.deepcopy(model))
    want = _weight_grads(reference, names, x, y)
    got = _weight_grads(model, names, x, y)
    out = {}
    for n in names:
        cos, angle = _cosine_angle(got[n], want[n])
        out[n] = {"cosine": cos, "angle_deg": angle}
    return out


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                params: list[nn.Parameter], clip: Optional[float]) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    return float(loss.detach())


def interleaved_step_times(models: dict[str, nn.Module], x: Tensor, y: Tensor, repeats: int = 20,
                           warmup: int = 2) -> dict[str, float]:
    """Median seconds of one step (zero_grad, forward, loss, backward) per model, the models
    timed round-robin with a rotating start so a busy machine slows every one alike.
    x: (B, 3, S, S), y: (B,)."""
    def step(model: nn.Module) -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - start

    for model in models.values():
        set_finetune_mode(model)
        for _ in range(warmup):
            step(model)
    names = list(models)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(step(models[name]))
    for model in models.values():
        model.zero_grad(set_to_none=True)
    return {n: statistics.median(v) for n, v in samples.items()}


def run_method(base: nn.Module, method: str, names: Sequence[str], data: FinetuneData,
               config: FinetuneConfig, seed: int, *, plain_layers: Sequence[str] = (),
               label: str = "", progress: bool = True) -> tuple[dict[str, Any], nn.Module]:
    """Fine-tune ``names`` of a copy of ``base`` with ``method`` (and ``plain_layers`` with plain
    autograd: memory and FLOPs of the fine-tuned layers cover ``names``). Returns the run's record
    (accuracy per epoch, memory, FLOPs, time, ranks, gradient agreement) and the fine-tuned
    model. Raises on failure."""
    device = torch.device(config.device)
    size, bs = config.image_size, config.batch_size
    n = data.train_x.shape[0]
    first_batches, _ = batch_order(n, bs, seed, 0)

    def batch(idx: Tensor, flips: Optional[Tensor] = None) -> Batch:
        flip = flips[idx] if flips is not None and config.flip else None
        return model_input(data.train_x[idx], size, flip).to(device), data.train_y[idx].to(device)

    n_calib = {"lance": config.lance_calibration_batches, "asi": config.asi_calibration_batches}
    calibration = [batch(i) for i in first_batches[:n_calib.get(method, 0)]]
    measure_x, measure_y = batch(first_batches[0])
    options = method_options(config, method)
    t0 = time.perf_counter()
    model, compressed = prepare_model(base.to(device), method, names, options, calibration, measure_x,
                                      plain_layers)
    if config.compact:
        lance_cl.compact_activations(model)
    setup_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    torch.manual_seed(seed)  # dropout masks: the same stream for every method of this seed
    epochs, step_times = [], []
    for epoch in range(config.epochs):
        batches, flips = batch_order(n, bs, seed, epoch)
        bar = EpochProgress(f"{label} epoch {epoch + 1}/{config.epochs}", len(batches), progress)
        set_finetune_mode(model)
        losses = []
        lr = optimizer.param_groups[0]["lr"]
        for idx in batches:
            x, y = batch(idx, flips)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            losses.append(_train_step(model, optimizer, x, y, params, config.clip_norm))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - start)
            bar.update(losses[-1])
        schedule.step()
        loss = statistics.fmean(losses)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} in epoch {epoch + 1}")
        accuracy = None
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            accuracy = evaluate(model, data.test_x, data.test_y, size, device)
        epochs.append({"epoch": epoch + 1, "lr": lr, "train_loss": loss, "test_accuracy": accuracy})
        bar.close(f"loss {loss:.4f}" + ("" if accuracy is None else f", test accuracy {accuracy:.2f}%"))
    agreement = gradient_agreement(model, names, measure_x, measure_y)
    set_finetune_mode(model)
    mem = lance_cl.measure_activation_memory(
        model, measure_x, lambda out: F.cross_entropy(out, measure_y), layers=list(names))
    model.zero_grad(set_to_none=True)
    layers = compressed_layers(model)
    flops = {nm: lance_cl.layer_flops(layers[nm]) for nm in names}
    rows = {r["name"]: r for r in lance_cl.report(model).to_dicts()}
    frozen = [nm for nm, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
              and nm not in names and nm not in plain_layers]
    timed = step_times[2:] if len(step_times) > 4 else step_times
    record = {
        "layers": list(names), "compressed_layers": compressed, "plain_layers": list(plain_layers),
        "options": options,
        "accuracy": epochs[-1]["test_accuracy"],
        "best_accuracy": max(e["test_accuracy"] for e in epochs if e["test_accuracy"] is not None),
        "epochs": epochs,
        "memory": {
            "finetuned_layers": mem["selected"], "whole_step": mem["total"],
            "peak_step": mem["peak_bytes"],
            "per_layer": {nm: mem["per_layer"].get(nm, 0) for nm in names},
            "frozen_layers": sum(mem["per_layer"].get(nm, 0) for nm in frozen),
            "plain_layers": sum(mem["per_layer"].get(nm, 0) for nm in plain_layers),
            "input_shapes": {nm: rows[nm]["input_shape"] for nm in names},
        },
        "flops": {"finetuned_layers": sum(f["total"] for f in flops.values()),
                  "vanilla_finetuned_layers": sum(f["vanilla_total"] for f in flops.values()),
                  "per_layer": {nm: f["total"] for nm, f in flops.items()}},
        "time": {"step_median_s": statistics.median(timed), "step_mean_s": statistics.fmean(timed),
                 "steps": len(step_times), "setup_s": setup_s, "train_s": sum(step_times)},
        "ranks": {nm: list(rows[nm]["ranks"]) for nm in names},
        "gradient": agreement,
        "trainable_parameters": sum(p.numel() for p in params),
    }
    return record, model
