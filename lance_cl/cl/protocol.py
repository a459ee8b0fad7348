"""GPM's training protocol as reusable Avalanche pieces.

- :func:`split_validation`: hold out a fraction (5 %) of a task's training set;
- :func:`with_validation`: do it for every experience of a benchmark and rebuild the benchmark
  from the remaining training subsets;
- :class:`GPMSchedulePlugin`: the HAT / GPM learning-rate schedule on the validation loss, early
  stop at ``lr < lr_min`` and best-validation weights restored at the end of each task.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models import avalanche_forward
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..train_modes import preserved_train_modes

__all__ = [
    "GPMSchedulePlugin",
    "evaluate_accuracy",
    "mixed_loader",
    "split_validation",
    "with_validation",
]


def split_validation(dataset: Any, fraction: float = 0.05, seed: int = 0) -> tuple[Any, Any]:
    """Split an Avalanche dataset into (train_subset, val_subset) with ``dataset.subset``.

    ``round(fraction * len)`` samples (at least one when ``fraction > 0``), drawn with a private
    ``torch.Generator`` seeded by ``seed`` (the global RNG is untouched); both subsets keep
    the original order of their samples. Deterministic for a given (dataset length, seed).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n = len(dataset)
    n_val = 0 if fraction == 0.0 else min(n - 1, max(1, int(round(fraction * n))))
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    val_idx = sorted(perm[:n_val].tolist())
    train_idx = sorted(perm[n_val:].tolist())
    return dataset.subset(train_idx), dataset.subset(val_idx)


def with_validation(benchmark: Any, fraction: float = 0.05, seed: int = 0) -> tuple[Any, list[Any]]:
    """Hold out ``fraction`` of every training experience as validation.

    Returns ``(new_benchmark, val_datasets)``: the new benchmark (Avalanche
    ``dataset_benchmark``) has the remaining training subsets as its train stream and the
    original test datasets as its test stream (task labels and per-task class ids unchanged);
    ``val_datasets[i]`` belongs to experience i. Experience i uses seed ``seed + i``.
    """
    from avalanche.benchmarks import dataset_benchmark

    train_sets, val_sets = [], []
    for i, exp in enumerate(benchmark.train_stream):
        tr, va = split_validation(exp.dataset, fraction, seed + i)
        train_sets.append(tr)
        val_sets.append(va)
    test_sets = [exp.dataset for exp in benchmark.test_stream]
    return dataset_benchmark(train_sets, test_sets), val_sets


def mixed_loader(dataset: Any, batch_size: int, seed: int = 0) -> DataLoader:
    """Loader over ``dataset`` (eval transforms) in a fixed pseudo-random order.

    Benchmarks store each task's samples grouped by class. Models here normalise with batch
    statistics (BatchNorm without running statistics), so a batch of one class would be
    normalised differently from a training batch, and "the first N samples" would all come from
    one class: evaluation, validation, calibration and basis samples all read in this order.
    """
    data = dataset.eval() if hasattr(dataset, "eval") else dataset
    collate = getattr(data, "collate_fn", None)
    sampler = torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(seed))
    return DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=collate)



@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataset: Any,
    *,
    task_label: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in percent) of ``model`` on ``dataset`` in eval mode.

    Items are ``(x, y)`` or ``(x, y, t)``; without a ``t`` every sample gets ``task_label``.
    Forward through ``avalanche_forward`` (task labels reach multi-task models). The model's
    per-module train/eval flags are restored afterwards.
    """
    total, correct, loss_sum = 0, 0, 0.0
    with preserved_train_modes(model):
        model.eval()
        for batch in mixed_loader(dataset, batch_size):
            x, y = batch[0].to(device), torch.as_tensor(batch[1]).to(device)
            if len(batch) >= 3:
                t = torch.as_tensor(batch[2]).to(device)
            else:
                t = torch.full((x.shape[0],), int(task_label), dtype=torch.long, device=device)
            out = avalanche_forward(model, x, t)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(dim=1) == y).sum())
            total += int(y.shape[0])
    if total == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return loss_sum / total, 100.0 * correct / total


class GPMSchedulePlugin(SupervisedPlugin):
    """HAT / GPM schedule: lr divided on a validation plateau, early stop, best weights restored.

    - ``before_training_exp``: every param group's lr := ``lr``; best-state tracking reset.
    - ``after_training_epoch``: validation loss / accuracy on ``val_datasets[i]`` (i = current
      experience index). A strictly lower loss than the best so far keeps a copy of
      ``model.state_dict()`` and resets the patience counter; otherwise the counter drops by
      one and when it reaches 0 the lr is divided by ``lr_factor`` (all param groups) and the
      counter resets. Training stops (``strategy.stop_training()``) once the lr falls below
      ``lr_min``; otherwise it runs to the strategy's ``train_epochs``.
    - ``after_training_exp``: the best-validation weights are loaded back.

    ``history[i]`` lists one dict per epoch of experience i: ``epoch`` (1-based), ``lr`` (the
    lr used during that epoch), ``val_loss``, ``val_acc`` (percent), ``improved``;
    ``best_epoch[i]`` is the epoch whose weights were restored.
    """

    def __init__(
        self,
        val_datasets: Sequence[Any],
        lr: float,
        lr_factor: float = 2.0,
        patience: int = 6,
        lr_min: float = 1e-5,
        eval_mb_size: int = 256,
    ) -> None:
        super().__init__()
        if lr <= 0 or lr_factor <= 1.0 or patience < 1:
            raise ValueError(f"need lr > 0, lr_factor > 1, patience >= 1; got {lr}, {lr_factor}, {patience}")
        self.val_datasets = list(val_datasets)
        self.lr = float(lr)
        self.lr_factor = float(lr_factor)
        self.patience = int(patience)
        self.lr_min = float(lr_min)
        self.eval_mb_size = int(eval_mb_size)
        self.history: dict[int, list[dict[str, Any]]] = {}
        self.best_epoch: dict[int, int] = {}
        self.current_lr = self.lr
        self._exp = -1
        self._best_loss = math.inf
        self._best_state: Optional[dict[str, Tensor]] = None
        self._wait = self.patience

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _set_lr(strategy: Any, lr: float) -> None:
        for group in strategy.optimizer.param_groups:
            group["lr"] = lr

    def validate(self, strategy: Any) -> tuple[float, float]:
        """(val loss, val acc %) of the strategy's model on the current experience's split."""
        i = strategy.experience.current_experience
        if i >= len(self.val_datasets) or self.val_datasets[i] is None:
            raise IndexError(f"GPMSchedulePlugin has no validation set for experience {i}")
        return evaluate_accuracy(
            strategy.model,
            self.val_datasets[i],
            task_label=int(getattr(strategy.experience, "task_label", 0)),
            batch_size=self.eval_mb_size,
            device=strategy.device,
        )

    # -- callbacks -----------------------------------------------------------------------------
    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._exp = int(strategy.experience.current_experience)
        self.current_lr = self.lr
        self._set_lr(strategy, self.lr)
        self._best_loss = math.inf
        self._best_state = None
        self._wait = self.patience
        self.history[self._exp] = []

    def after_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        loss, acc = self.validate(strategy)
        entry = {
            "epoch": len(self.history[self._exp]) + 1,
            "lr": self.current_lr,
            "val_loss": loss,
            "val_acc": acc,
            "improved": loss < self._best_loss,
        }
        self.history[self._exp].append(entry)
        if entry["improved"]:
            self._best_loss = loss
            self._best_state = copy.deepcopy(strategy.model.state_dict())
            self.best_epoch[self._exp] = entry["epoch"]
            self._wait = self.patience
            return
        self._wait -= 1
        if self._wait <= 0:
            self.current_lr /= self.lr_factor
            self._wait = self.patience
            self._set_lr(strategy, self.current_lr)
            if self.current_lr < self.lr_min:
                strategy.stop_training()

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self._best_state is not None:
            strategy.model.load_state_dict(self._best_state)
        self._best_state = None

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Histories and best epochs (the per-task tracking restarts at every task)."""
        return {"history": copy.deepcopy(self.history), "best_epoch": dict(self.best_epoch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {int(k): list(v) for k, v in state.get("history", {}).items()}
        self.best_epoch = {int(k): int(v) for k, v in state.get("best_epoch", {}).items()}
