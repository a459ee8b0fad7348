"""Continual-learning metrics from an accuracy matrix R.

``R[i, j]`` is the accuracy on task j after training task i (any unit; the runner uses
percent). Only ``i >= j`` is used by these metrics. Every function takes either the full
T x T matrix or the k x T (or k x k) matrix of a run that finished k tasks, and an optional
``k`` that restricts it to the top-left k x k block: the metrics *after k tasks*.
With a single task there is nothing to forget: BWT and forgetting are 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np

__all__ = [
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "learning_accuracy",
    "summary",
]

Matrix = Union[np.ndarray, Sequence[Sequence[float]]]


def _block(R: Matrix, k: Optional[int]) -> np.ndarray:
    """The k x k top-left block of R (k defaults to the number of rows), as float64."""
    a = np.asarray(R, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"accuracy matrix must be 2-D, got shape {a.shape}")
    if k is None:
        k = a.shape[0]
    if not 1 <= k <= min(a.shape):
        raise ValueError(f"k={k} is out of range for an accuracy matrix of shape {a.shape}")
    return a[:k, :k]


def average_accuracy(R: Matrix, k: Optional[int] = None) -> float:
    """ACC = mean_j R[k-1, j] over j < k (accuracy on every seen task after the last one)."""
    b = _block(R, k)
    return float(b[-1].mean())


def backward_transfer(R: Matrix, k: Optional[int] = None) -> float:
    """BWT = mean_{j < k-1} (R[k-1, j] - R[j, j]) (Lopez-Paz & Ranzato); 0.0 when k == 1."""
    b = _block(R, k)
    n = b.shape[0]
    if n == 1:
        return 0.0
    return float(np.mean(b[-1, :-1] - np.diag(b)[:-1]))


def forgetting(R: Matrix, k: Optional[int] = None) -> float:
    """Chaudhry et al.: mean_{j < k-1} (max_{j <= i < k-1} R[i, j] - R[k-1, j]); 0.0 when k == 1."""
    b = _block(R, k)
    n = b.shape[0]
    if n == 1:
        return 0.0
    drops = [b[j : n - 1, j].max() - b[n - 1, j] for j in range(n - 1)]
    return float(np.mean(drops))


def learning_accuracy(R: Matrix, k: Optional[int] = None) -> float:
    """LA = mean_j R[j, j] over j < k (accuracy on each task right after learning it)."""
    b = _block(R, k)
    return float(np.mean(np.diag(b)))


def summary(R: Matrix, k: Optional[int] = None) -> dict[str, float]:
    """All four metrics: keys ``acc``, ``bwt``, ``forgetting``, ``learning_accuracy``."""
    return {
        "acc": average_accuracy(R, k),
        "bwt": backward_transfer(R, k),
        "forgetting": forgetting(R, k),
        "learning_accuracy": learning_accuracy(R, k),
    }
