"""One registry from plain layer types to their compressed versions (one file per layer type)."""
from __future__ import annotations

from typing import Callable

from torch import nn

COMPRESSED_LAYERS: dict[type[nn.Module], type] = {}


def register_compressed_layer(plain_type: type[nn.Module]) -> Callable[[type], type]:
    """Class decorator: ``cls`` is the compressed version of ``plain_type``."""

    def wrap(cls: type) -> type:
        COMPRESSED_LAYERS[plain_type] = cls
        return cls

    return wrap


def compressed_type_for(module: nn.Module) -> type:
    """The compressed class for ``module``'s exact type, or a clear error."""
    cls = COMPRESSED_LAYERS.get(type(module))
    if cls is None:
        supported = ", ".join(sorted(t.__name__ for t in COMPRESSED_LAYERS))
        raise TypeError(f"{type(module).__name__} layers cannot be compressed; supported layer "
                        f"types: {supported}")
    return cls
