"""Memory of one training step as a run measures it, at the first iteration of every task.

:class:`ActivationMemoryProbe` is the Avalanche plugin; :func:`measure_step_memory` the
side-effect-free measurement; :func:`body_layer_names` the layers counted for every method.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import is_multi_task_module
from torch import nn

from .subspace import head_layer_names

__all__ = ["ActivationMemoryProbe", "body_layer_names", "measure_step_memory"]


def body_layer_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` / ``nn.Conv2d`` (compressed or not) that is not one of the
    model's heads (:func:`~lance_cl.cl.subspace.head_layer_names`)."""
    heads = set(head_layer_names(model))
    return [name for name, m in model.named_modules()
            if name and isinstance(m, (nn.Linear, nn.Conv2d)) and name not in heads]


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
            count_buffers=False,   # fixed factors are training-time state (docs/continual.md), not activations
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
