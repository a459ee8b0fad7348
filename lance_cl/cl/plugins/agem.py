"""A-GEM with a checkpointable episodic memory.

Avalanche's ``AGEMPlugin`` keeps its memory as dataset objects plus a live data-loader
iterator, neither of which a checkpoint can hold. :class:`ResumableAGEMPlugin` picks the
memory samples itself (a uniform random subset of each task, drawn with Python's ``random`` as
Avalanche does), remembers their indices and rebuilds the same memory from the task datasets
on resume. Avalanche's memory loader draws its randomness lazily, at the first reference batch,
from the global RNG that the runner's checkpoint restores: a resumed run samples exactly the
reference batches an uninterrupted run samples.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from avalanche.training.plugins import AGEMPlugin

from ..sizes import dataset_bytes

__all__ = ["ResumableAGEMPlugin"]


class ResumableAGEMPlugin(AGEMPlugin):
    """``AGEMPlugin`` whose memory survives ``state_dict`` / ``load_state_dict``.

    The gradient projection is Avalanche's, unchanged. ``state_dict()`` holds, per finished
    task, the indices of its memory samples into that task's training dataset;
    ``load_state_dict(state, datasets)`` needs those tasks' training datasets in task order
    (the runner passes the datasets of ``train_stream[:k]``).
    """

    def __init__(self, patterns_per_experience: int, sample_size: int):
        super().__init__(patterns_per_experience, sample_size)
        self.memory_indices: list[list[int]] = []

    def update_memory(self, dataset, num_workers: int = 0, **kwargs: Any) -> None:
        """Add a uniform random subset of ``dataset`` (at most ``patterns_per_experience``)."""
        indices = list(range(len(dataset)))
        if len(indices) > self.patterns_per_experience:
            random.shuffle(indices)
            indices = indices[: self.patterns_per_experience]
        self.memory_indices.append(indices)
        # the subset is no larger than patterns_per_experience: Avalanche keeps it whole
        super().update_memory(dataset.subset(indices), num_workers=num_workers, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Memory sample indices per task."""
        return {"memory_indices": [list(ix) for ix in self.memory_indices]}

    def load_state_dict(self, state: dict[str, Any], datasets: Sequence[Any] = ()) -> None:
        """Rebuild the memory from ``datasets`` (task i's training dataset at position i)."""
        indices = [list(ix) for ix in state.get("memory_indices", [])]
        if len(datasets) < len(indices):
            raise ValueError(
                f"A-GEM's checkpoint holds memory for {len(indices)} tasks but only "
                f"{len(datasets)} task datasets were given; pass the training datasets of every "
                "finished task, in task order")
        self.buffers, self.memory_indices = [], []
        for dataset, ix in zip(datasets, indices):
            # each subset is no larger than patterns_per_experience: Avalanche keeps it whole
            AGEMPlugin.update_memory(self, dataset.subset(ix))
        self.memory_indices = indices

    def load_run_state(self, state: dict[str, Any], strategy: Any, past_datasets: Sequence[Any] = ()) -> None:
        """Resume: :meth:`load_state_dict` with the finished tasks' training datasets."""
        self.load_state_dict(state, past_datasets)

    def memory_figures(self, strategy: Any) -> dict[str, int]:
        """The episodic memory's input bytes (persistent); nothing extra while training."""
        return {"persistent_bytes": sum(dataset_bytes(b) for b in self.buffers),
                "training_extra_bytes": 0}
