"""What every compact module shares: it *is* an instance of the plain type (same Parameters,
buffers and state_dict keys) and switches to its compact Function only when autograd will need
what it saves."""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from ..swap import rebind

COMPACT_MODULES: dict[type[nn.Module], type["CompactModule"]] = {}


def register_compact_module(plain_type: type[nn.Module]) -> Callable[[type], type]:
    """Class decorator: ``cls`` is the compact version of modules whose exact type is ``plain_type``."""

    def wrap(cls: type) -> type:
        cls.plain_type = plain_type
        COMPACT_MODULES[plain_type] = cls
        return cls

    return wrap


def needs_saving(x: Tensor) -> bool:
    """True when autograd will record this op (a forward that saves nothing is the plain one)."""
    return torch.is_grad_enabled() and x.requires_grad


class CompactModule(nn.Module):
    """Mixin of the compact modules. ``options`` (class attribute): the option names the
    constructor of this kind takes from :func:`lance_cl.compact_activations`."""

    plain_type: ClassVar[type[nn.Module]]
    kind: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_module(cls, module: nn.Module, **options: Any) -> "CompactModule":
        out = rebind(module, cls)
        for name in cls.options:
            setattr(out, f"compact_{name}", options[name])
        return out

    def to_plain(self) -> nn.Module:
        plain = rebind(self, self.plain_type)
        for name in self.options:
            plain.__dict__.pop(f"compact_{name}", None)
        return plain

    def saves(self) -> str:
        """What this module keeps for backward, in words (for the report)."""
        raise NotImplementedError
