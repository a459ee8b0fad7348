"""Dropout saving a seed (mask regenerated in backward) or a 1-bit mask."""
from __future__ import annotations

from torch import Tensor, nn

from ...core.compact import compact_dropout
from .base import CompactModule, needs_saving, register_compact_module


@register_compact_module(nn.Dropout)
class CompactDropout(CompactModule, nn.Dropout):
    kind = "dropout"
    options = ("dropout",)
    compact_dropout: str

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.p > 0 and needs_saving(x)):
            return nn.Dropout.forward(self, x)
        return compact_dropout(x, self.p, self.compact_dropout, self.inplace)

    def saves(self) -> str:
        return "8-byte seed" if self.compact_dropout == "regenerate" else "1-bit mask"
