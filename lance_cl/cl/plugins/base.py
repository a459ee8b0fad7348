"""Shared machinery of the subspace-protecting plugins (LANCE-CL, GPM, SGP).

Per protected layer a basis P (d x k) of the fan-in space is kept; it grows after every task by
the GPM energy rule with the threshold schedule eps_t = eps + t * eps_step. BatchNorm affine
parameters and the biases of protected layers are trained on the first task only (GPM convention);
task heads are never touched.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import avalanche_forward
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ...core.linalg import check_eps, grow_basis
from ...core.tucker import compact
from ..protocol import mixed_loader
from ..subspace import (DEFAULT_EXCLUDE, check_optimizer, collect_fan_in_grams, fan_in_dim,
                        protected_layer_names, reset_momentum)

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def forward_batch(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """(x, y, task_labels) mini-batch -> model output, routing task labels to multi-head models."""
    return avalanche_forward(model, batch[0], batch[-1])


class SubspacePlugin(SupervisedPlugin):
    """Base class: protected bases, threshold schedule, freezing rules, optimizer guard, state.

    End-of-task contract (independent of the order of ``strategy.plugins``): the protected basis
    must describe the weights a task *ends* with. ``after_training_exp`` therefore only records
    that the finished task is pending (with a reference to its dataset); the basis grows, and the
    task is finished (``finish_task``, layer log, ``tasks_trained``), in ``after_training``, which
    Avalanche calls once every plugin's ``after_training_exp`` has run; when one ``train()`` call
    holds several experiences, a pending task is finished first thing in the next
    ``before_training_exp``, which runs after every plugin's ``after_training_exp`` of the
    previous experience. A plugin that changes the weights at the end of a task (such as
    :class:`~lance_cl.cl.protocol.GPMSchedulePlugin` restoring its best-validation weights) must
    do so in ``after_training_exp``, and no plugin may change the protected weights in
    ``before_training_exp``. ``state_dict`` refuses to run while a task is pending.
    """

    name = "subspace"

    def __init__(self, eps: float = 0.97, eps_step: float = 0.003, layers: Optional[Sequence[str]] = None,
                 exclude: Sequence[str] = DEFAULT_EXCLUDE, basis_samples: int = 125,
                 small_layer_dim: int = 0, allow_unsafe_optimizer: bool = False,
                 eval_mb_size: int = 128, heads: Optional[Sequence[str]] = None):
        super().__init__()
        self.eps = check_eps(eps)
        self.eps_step = float(eps_step)
        self.layers = None if layers is None else list(layers)
        self.exclude = tuple(exclude)
        self.heads = None if heads is None else list(heads)   # None: detected (head_layer_names)
        self.basis_samples = int(basis_samples)
        self.small_layer_dim = int(small_layer_dim)
        self.allow_unsafe_optimizer = allow_unsafe_optimizer
        self.eval_mb_size = eval_mb_size
        self.bases: dict[str, Tensor] = {}          # layer name -> P (d, k), float32, CPU
        self.tasks_trained = 0
        self.layer_log: list[dict[str, Any]] = []    # per task, per layer: ranks, energy, frozen
        self._names: Optional[list[str]] = None
        self._pending: Optional[Any] = None          # dataset of a trained task whose basis has not grown

    # -- helpers ------------------------------------------------------------------------------
    def threshold(self, task: int) -> float:
        """eps_t = eps + t * eps_step, capped at 1."""
        return min(1.0, self.eps + task * self.eps_step)

    def protected_names(self, model: nn.Module) -> list[str]:
        if self._names is None:
            self._names = protected_layer_names(model, self.layers, self.exclude, self.heads)
        return self._names

    def protected_weights(self, model: nn.Module) -> list[nn.Parameter]:
        return [model.get_submodule(n).weight for n in self.protected_names(model)]

    def first_task_only_params(self, model: nn.Module) -> list[nn.Parameter]:
        """BatchNorm/GroupNorm/LayerNorm affine parameters and biases of protected layers."""
        params = []
        for module in model.modules():
            if isinstance(module, _NORM_TYPES):
                params.extend(p for p in module.parameters(recurse=False))
        for name in self.protected_names(model):
            bias = model.get_submodule(name).bias
            if bias is not None:
                params.append(bias)
        return params

    def task_loader(self, strategy, batch_size: Optional[int] = None,
                    dataset: Optional[Any] = None) -> DataLoader:
        """``dataset`` (default: the current experience's training data) with eval transforms, in
        a fixed mixed order (so the first ``basis_samples`` are not all of one class)."""
        data = strategy.experience.dataset if dataset is None else dataset
        return mixed_loader(data, batch_size or self.eval_mb_size)

    def _device_batches(self, loader: DataLoader, device):
        for batch in loader:
            yield [b.to(device) for b in batch]

    # -- Avalanche callbacks ------------------------------------------------------------------
    def before_training_exp(self, strategy, *args, **kwargs):
        self._finish_pending(strategy)      # earlier experience of the same train() call
        model = strategy.model
        names = self.protected_names(model)
        check_optimizer(strategy.optimizer, self.protected_weights(model), type(self).__name__,
                        self.allow_unsafe_optimizer)
        reset_momentum(strategy.optimizer, self.protected_weights(model))
        if self.tasks_trained > 0:
            for p in self.first_task_only_params(model):
                p.requires_grad_(False)
        self._task_log = {"task": self.tasks_trained, "layers": {n: {} for n in names}}
        self.prepare_task(strategy)

    def after_training_exp(self, strategy, *args, **kwargs):
        """Only mark the task pending: other plugins may still change the weights (class doc)."""
        self._pending = strategy.experience.dataset

    def after_training(self, strategy, *args, **kwargs):
        self._finish_pending(strategy)

    def _finish_pending(self, strategy) -> None:
        """Grow the bases from the pending task's data and the weights as they are now."""
        if self._pending is None:
            return
        dataset, self._pending = self._pending, None
        model = strategy.model
        names = self.protected_names(model)
        loader = self.task_loader(strategy, dataset=dataset)
        rows: dict[str, int] = {}
        grams = collect_fan_in_grams(model, names, self._device_batches(loader, strategy.device),
                                     forward_batch, max_samples=self.basis_samples, rows=rows)
        eps_t = self.threshold(self.tasks_trained)
        for name in names:
            old = self.bases.get(name)
            d = fan_in_dim(model.get_submodule(name))
            new, covered = grow_basis(grams[name], old, eps_t, rank_bound=rows.get(name))
            self.update_basis(name, old, new, grams[name])
            self._task_log["layers"][name].update(
                basis_before=0 if old is None else old.shape[1], basis_added=new.shape[1],
                basis_after=self.bases[name].shape[1], dim=d, energy_covered_before=covered)
        self.finish_task(strategy)
        self.layer_log.append(self._task_log)
        self.tasks_trained += 1

    # -- subclass hooks -------------------------------------------------------------------------
    def prepare_task(self, strategy) -> None:
        """Before training a task (optimizer checked, first-task-only parameters frozen)."""

    def finish_task(self, strategy) -> None:
        """After the bases grew from the weights the task ended with (see the class doc)."""

    def update_basis(self, name: str, old: Optional[Tensor], new: Tensor, gram: Tensor) -> None:
        """Append ``new`` (d, r) to the basis; bases are kept on the CPU in float32 (they are
        persistent state; a training device gets what it needs in ``prepare_task``)."""
        basis = new if old is None else torch.cat([old.to(new), new], dim=1)
        self.bases[name] = compact(basis[:, : basis.shape[0]].float().cpu())

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: bases, task count, logs (CPU tensors and plain data).
        Only between ``train()`` calls: a task whose basis is still pending cannot be saved."""
        if self._pending is not None:
            raise RuntimeError(f"{type(self).__name__}.state_dict(): the last task's basis grows "
                               f"in after_training; checkpoint after strategy.train() returns")
        return {"bases": {k: v.clone() for k, v in self.bases.items()},
                "tasks_trained": self.tasks_trained, "layer_log": list(self.layer_log),
                "eps": self.eps, "eps_step": self.eps_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bases = {k: v.detach().float().cpu().clone() for k, v in state["bases"].items()}
        self.tasks_trained = int(state["tasks_trained"])
        self.layer_log = list(state["layer_log"])
        self.eps, self.eps_step = state["eps"], state["eps_step"]
        self._pending = None

    def restore_model_state(self, model: nn.Module) -> None:
        """Re-apply the freezing a resumed run would have set up (first-task-only parameters)."""
        if self.tasks_trained > 0:
            for p in self.first_task_only_params(model):
                p.requires_grad_(False)

    # -- memory (docs/continual.md) -----------------------------------------------------------
    def persistent_bytes(self) -> int:
        """Bytes of CL state kept between tasks (bases and method extras)."""
        return sum(b.numel() * b.element_size() for b in self.bases.values())

    def training_extra_bytes(self) -> int:
        """Bytes held only while a task trains, beyond the model and its activations."""
        return 0

    def memory_stats(self, model: Optional[nn.Module] = None) -> dict[str, int]:
        return {"persistent_bytes": self.persistent_bytes(),
                "training_extra_bytes": self.training_extra_bytes()}

    # -- what a run records (lance_cl.strategies: memory_figures, task_diagnostics, state) ------
    def memory_figures(self, strategy) -> dict[str, int]:
        """Persistent and training-extra bytes of this plugin (:meth:`memory_stats`)."""
        return self.memory_stats(strategy.model)

    def task_diagnostics(self, task: int) -> dict[str, Any]:
        """Per protected layer, what was decided for ``task`` (a copy of its layer-log entry:
        ranks, energy covered by the protected basis, basis growth, frozen, storage); {} for a
        task not finished yet."""
        for entry in self.layer_log:
            if entry["task"] == task:
                return copy.deepcopy(entry["layers"])
        return {}

    def load_run_state(self, state: dict[str, Any], strategy, past_datasets: Sequence[Any] = ()) -> None:
        """Resume from :meth:`state_dict` and re-apply its effects on ``strategy.model``."""
        self.load_state_dict(state)
        self.restore_model_state(strategy.model)
