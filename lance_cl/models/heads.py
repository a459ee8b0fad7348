"""Multi-head (task-incremental) output routing shared by the CL backbones."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MultiHeadModule", "normalise_n_classes"]


def normalise_n_classes(n_tasks: int, n_classes: int | Sequence[int]) -> list[int]:
    """Expand ``n_classes`` to one class count per task (validated)."""
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
    if isinstance(n_classes, int):
        counts = [n_classes] * n_tasks
    else:
        counts = [int(c) for c in n_classes]
        if len(counts) != n_tasks:
            raise ValueError(f"n_classes has {len(counts)} entries but n_tasks={n_tasks}")
    if any(c < 1 for c in counts):
        raise ValueError(f"every task needs at least one class, got {counts}")
    return counts


class MultiHeadModule(nn.Module):
    """Base class: ``features(x) -> (B, D)`` followed by one bias-free linear head per task.

    ``forward(x, task_label)`` takes either one task id for the whole batch or a tensor of
    per-sample task ids of shape (B,); each sample then goes through its own head. When the
    heads of the tasks present in a batch have different widths, the output has the largest
    width and the missing logits of narrower heads are filled with ``pad_value`` (a large
    negative number, so they never win an argmax and get ~zero softmax mass).
    """

    heads: nn.ModuleList
    pad_value: float = -1e4

    def _make_heads(self, in_features: int, n_tasks: int, n_classes: int | Sequence[int]) -> None:
        self.n_classes = normalise_n_classes(n_tasks, n_classes)
        self.n_tasks = n_tasks
        self.heads = nn.ModuleList(nn.Linear(in_features, c, bias=False) for c in self.n_classes)

    def features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_task(self, t: int) -> int:
        if not 0 <= t < len(self.heads):
            raise IndexError(f"task label {t} out of range: model has {len(self.heads)} heads")
        return t

    def forward(self, x: Tensor, task_label: int | Tensor = 0) -> Tensor:
        """x: (B, ...) -> logits (B, n_classes[task]) (max width over tasks when mixed)."""
        h = self.features(x)
        if isinstance(task_label, Tensor):
            if task_label.numel() == 1:
                task_label = int(task_label.reshape(()).item())
            else:
                labels = task_label.reshape(-1).to(device=h.device, dtype=torch.long)
                if labels.shape[0] != h.shape[0]:
                    raise ValueError(
                        f"got {labels.shape[0]} task labels for a batch of {h.shape[0]} samples"
                    )
                present = [self._check_task(int(t)) for t in torch.unique(labels).tolist()]
                if len(present) == 1:
                    return self.heads[present[0]](h)
                width = max(self.n_classes[t] for t in present)
                out = h.new_full((h.shape[0], width), self.pad_value)
                for t in present:
                    idx = (labels == t).nonzero(as_tuple=True)[0]
                    out[idx, : self.n_classes[t]] = self.heads[t](h[idx])
                return out
        return self.heads[self._check_task(int(task_label))](h)
