"""Multi-head (task-incremental) output routing shared by the CL backbones.

The backbones are Avalanche ``MultiTaskModule`` instances, but importing this module does not
import Avalanche (a few hundred modules): :class:`MultiHeadModule` is a plain ``nn.Module``
class, and building a model makes it an instance of a subclass that also derives from
``MultiTaskModule`` (one per backbone class, created on first use), so Avalanche loads only
when a multi-task model is built.
"""

from __future__ import annotations

import copyreg
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["MultiHeadModule", "normalise_n_classes"]

TaskLabels = Union[int, Tensor]


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


@lru_cache(maxsize=None)
def _multi_task_class(cls: type) -> type:
    """``cls`` with Avalanche's ``MultiTaskModule`` added as the last base (same name, module and
    methods; ``cls``'s methods come first in the MRO, as if ``MultiHeadModule`` derived from it)."""
    from avalanche.models import MultiTaskModule

    return type(cls.__name__, (cls, MultiTaskModule),
                {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                 "_declared_class": cls})


def _new_multi_head(cls: type) -> "MultiHeadModule":
    """Unpickling helper: an empty instance of ``cls``'s multi-task class."""
    return object.__new__(_multi_task_class(cls))


class MultiHeadModule(nn.Module):
    """Base class: ``features(x) -> (B, D)`` followed by one bias-free linear head per task.

    Every instance is an Avalanche :class:`~avalanche.models.MultiTaskModule` (see the module
    docstring; ``isinstance(model, SmallCNN)`` holds as usual), so strategies (through
    ``avalanche_forward``) call ``model(x, task_labels)``. ``task_labels`` is either one task
    id for the whole batch (int or one-element tensor) or a tensor of per-sample ids of shape
    (B,). Unlike Avalanche's default routing, the features are always computed on the *whole*
    batch (BatchNorm here uses batch statistics, so splitting the batch by task would change
    them) and only the heads are selected per sample. When the heads of the tasks present in a
    batch have different widths, the output has the largest width and the missing logits of
    narrower heads are filled with ``pad_value`` (a large negative number, so they never win an
    argmax and get ~zero softmax mass). ``task_labels=None`` returns ``{task: logits}`` for
    every head.

    The heads are fixed: one per task, created at construction, so :meth:`adaptation` does
    nothing (Avalanche never adds or resizes heads).
    """

    heads: nn.ModuleList
    pad_value: float = -1e4

    def __new__(cls, *args: Any, **kwargs: Any) -> "MultiHeadModule":
        declared = cls.__dict__.get("_declared_class", cls)
        return object.__new__(_multi_task_class(declared) if declared is cls else cls)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # pickle names a class by module and qualname, which lead to the declared class: rebuild
        # the multi-task instance through _new_multi_head, keeping the rest of the default reduce
        reduced = super().__reduce_ex__(protocol)
        if isinstance(reduced, tuple) and reduced[0] is copyreg.__newobj__ and len(reduced[1]) == 1:
            return (_new_multi_head, (type(self)._declared_class,)) + reduced[2:]
        return reduced

    def _make_heads(self, in_features: int, n_tasks: int, n_classes: int | Sequence[int]) -> None:
        self.n_classes = normalise_n_classes(n_tasks, n_classes)
        self.n_tasks = n_tasks
        self.heads = nn.ModuleList(nn.Linear(in_features, c, bias=False) for c in self.n_classes)
        self.max_class_label = max(self.n_classes)
        self.known_train_tasks_labels = set(range(n_tasks))

    def segment_names(self) -> tuple[str, ...]:
        """Segments this model can recompute in backward (see :func:`lance_cl.compact_activations`):
        "stem" where the model defines ``stem(x)``, the block that reads the input batch."""
        return ("stem",) if callable(getattr(self, "stem", None)) else ()

    def segment_modules(self, name: str) -> Optional[tuple[nn.Module, ...]]:
        """The modules segment ``name`` applies in order, when the model declares them in
        ``segment_chains`` (then ``fn(x)`` is their composition): a conv, a BatchNorm and
        per-sample ops are recomputed one batch chunk at a time."""
        names = getattr(self, "segment_chains", {}).get(name)
        return None if names is None else tuple(getattr(self, n) for n in names)

    def run_segment(self, name: str, fn, x: Tensor) -> Tensor:
        """``fn(x)``, recomputed in backward when ``name`` is in ``self.recomputed_segments``."""
        if name in getattr(self, "recomputed_segments", ()):
            from ..core.compact import recompute_segment

            return recompute_segment(fn, x, self, modules=self.segment_modules(name),
                                     tail=getattr(self, "segment_tail", "recompute"))
        return fn(x)

    def features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adaptation(self, experience: Any = None) -> None:
        """No-op: the heads are created at construction (one per task) and never change."""

    def _check_task(self, t: int) -> int:
        if not 0 <= t < len(self.heads):
            raise IndexError(f"task label {t} out of range: model has {len(self.heads)} heads")
        return t

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        """x: (B, ...) -> logits (B, n_classes[task_label])."""
        return self.heads[self._check_task(int(task_label))](self.features(x))

    def forward_all_tasks(self, x: Tensor) -> dict[int, Tensor]:
        """x: (B, ...) -> {task: logits (B, n_classes[task])} for every head."""
        h = self.features(x)
        return {t: head(h) for t, head in enumerate(self.heads)}

    def forward(
        self, x: Tensor, task_labels: Optional[TaskLabels] = 0, *, task_label: Optional[TaskLabels] = None
    ) -> Any:
        """x: (B, ...) -> logits (B, n_classes[task]) (max width over tasks when mixed).

        ``task_labels`` (positional or keyword; ``task_label=`` is an alias) is an int, a
        one-element tensor or a (B,) tensor of per-sample task ids; None gives every head.
        """
        if task_label is not None:
            task_labels = task_label
        if task_labels is None:
            return self.forward_all_tasks(x)
        if isinstance(task_labels, Tensor):
            if task_labels.numel() == 1:
                task_labels = int(task_labels.reshape(()).item())
            else:
                return self._forward_routed(x, task_labels)
        return self.forward_single_task(x, int(task_labels))

    def _forward_routed(self, x: Tensor, task_labels: Tensor) -> Tensor:
        h = self.features(x)
        labels = task_labels.reshape(-1).to(device=h.device, dtype=torch.long)
        if labels.shape[0] != h.shape[0]:
            raise ValueError(f"got {labels.shape[0]} task labels for a batch of {h.shape[0]} samples")
        present = [self._check_task(int(t)) for t in torch.unique(labels).tolist()]
        if len(present) == 1:
            return self.heads[present[0]](h)
        width = max(self.n_classes[t] for t in present)
        out = h.new_full((h.shape[0], width), self.pad_value)
        for t in present:
            idx = (labels == t).nonzero(as_tuple=True)[0]
            out[idx, : self.n_classes[t]] = self.heads[t](h[idx])
        return out
