"""BatchNorm1d / 2d / 3d saving their normalised input once (float, bf16 or int8)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...core.compact import compact_batch_norm
from .base import CompactModule, needs_saving, register_compact_module


class _CompactBatchNorm(CompactModule):
    kind = "batch_norm"
    options = ("batch_norm",)
    compact_batch_norm: str

    def forward(self, x: Tensor) -> Tensor:
        weight_grad = self.weight is not None and self.weight.requires_grad
        if not (needs_saving(x) or (weight_grad and torch.is_grad_enabled())):
            return self.plain_type.forward(self, x)
        self._check_input_dim(x)
        # the exponential-average factor and the choice of statistics, as nn.BatchNorm decides them
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return compact_batch_norm(x, self.weight, self.bias,
                                  self.running_mean if track else None,
                                  self.running_var if track else None,
                                  batch_stats, factor, self.eps, self.compact_batch_norm)

    def saves(self) -> str:
        return {"float": "normalised input", "bf16": "normalised input (bf16)",
                "int8": "normalised input (int8 per channel)"}[self.compact_batch_norm]


@register_compact_module(nn.BatchNorm1d)
class CompactBatchNorm1d(_CompactBatchNorm, nn.BatchNorm1d):
    pass


@register_compact_module(nn.BatchNorm2d)
class CompactBatchNorm2d(_CompactBatchNorm, nn.BatchNorm2d):
    pass


@register_compact_module(nn.BatchNorm3d)
class CompactBatchNorm3d(_CompactBatchNorm, nn.BatchNorm3d):
    pass
