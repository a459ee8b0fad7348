"""Byte counts of the state a continual-learning method keeps (tensors, data sets, modules)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["dataset_bytes", "parameter_bytes", "tensor_bytes"]


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable through dicts, lists, tuples and objects with a tensor
    ``.data`` (Avalanche's ``ParamData``); 0 for anything else."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if isinstance(getattr(obj, "data", None), torch.Tensor):
        return tensor_bytes(obj.data)
    return 0


def dataset_bytes(dataset: Any) -> int:
    """Bytes of a data set's inputs: number of samples x bytes of the first sample's input
    (``dataset[0][0]``); 0 for an empty data set."""
    n = len(dataset)
    return 0 if n == 0 else n * tensor_bytes(dataset[0][0])


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
