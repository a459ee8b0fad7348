"""Swapping a module for another class that shares its state: how compressed and compact layers
replace plain ones (and back) without touching Parameters, buffers or state_dict keys."""
from __future__ import annotations

from torch import nn


def rebind(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A new ``cls`` instance sharing ``module``'s state: the same attributes, Parameter and
    buffer objects and children (in dicts of its own), so optimizers and state_dict keys are
    unaffected."""
    out = cls.__new__(cls)
    out.__dict__.update(module.__dict__)
    out._parameters = dict(module._parameters)
    out._buffers = dict(module._buffers)
    out._modules = dict(module._modules)
    return out


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path, not "") with ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
