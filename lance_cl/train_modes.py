"""Saving and restoring module state around work that must not change it: the train / eval
mode of every module, and buffers such as BatchNorm running statistics.

``model.train(was_training)`` puts every submodule in the model's own mode and so loses modules
that were deliberately in another one (a frozen BatchNorm in eval mode inside a training model);
these helpers keep each module's own flag.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def train_modes(model: nn.Module) -> dict[nn.Module, bool]:
    """The ``training`` flag of ``model`` and of every submodule."""
    return {m: m.training for m in model.modules()}


def restore_train_modes(modes: dict[nn.Module, bool]) -> None:
    """Put every module back in the mode :func:`train_modes` recorded."""
    for module, training in modes.items():
        module.training = training


@contextlib.contextmanager
def preserved_train_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the modes may change freely; on exit (even on an error) every module of
    ``model`` is back in its own mode."""
    modes = train_modes(model)
    try:
        yield model
    finally:
        restore_train_modes(modes)


@contextlib.contextmanager
def preserved_buffers(modules: Iterable[nn.Module]) -> Iterator[None]:
    """On exit (even on an error) the buffers of ``modules`` (their own, not their children's:
    e.g. BatchNorm running statistics and batch counts) hold the values they had on entry."""
    modules = list(modules)
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(modules, saved):
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)
