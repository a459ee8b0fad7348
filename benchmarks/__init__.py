"""Benchmark definitions (split digits / MNIST / CIFAR, ...) and the activation-memory bench."""

from .registry import *  # noqa: F401,F403  (the registry's public names)
from .registry import __all__  # noqa: F401
from . import vision  # noqa: E402,F401  (registers split_cifar10/100, split_miniimagenet, five_datasets)
