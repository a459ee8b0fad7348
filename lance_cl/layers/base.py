"""What every compressed layer shares: construction around an existing module, one explicit mode
(:class:`LayerMode`) that decides which forward runs, and conversion back to the plain module.

What depends on the compression method (its autograd Function, the bytes it saves, its FLOPs,
which layers it supports) lives in the method object ``layer.compressor`` (see
:mod:`lance_cl.compressors`); what depends on the layer type (its plain forward, its Tucker
Function, its geometry) lives in one file per layer type (``conv2d.py``, ``linear.py``).
"""
from __future__ import annotations

import enum
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..compressors import CalibrationStatistics, Compressor, build_compressor
from .swap import rebind


class LayerMode(enum.Enum):
    """What a compressed layer's forward does while gradients are recorded.

    ``COMPRESSED``: the method's forward (saves what the method keeps); ``CALIBRATING``: plain
    forward, and each input's activation view feeds the calibration statistics;
    ``FULL_BACKPROP``: plain autograd (saves the input), e.g. LANCE-CL's published first task;
    ``STORE_INPUT``: plain autograd because keeping the input is cheaper than the core (the
    caller projects the weight gradient itself); ``FROZEN``: the weight is not trained, only it is
    saved and the input gradient stays exact. A weight whose ``requires_grad`` is turned off by
    hand takes the frozen forward in ``COMPRESSED`` mode too. Without grad mode every layer runs its plain forward.
    """

    COMPRESSED = "compressed"
    CALIBRATING = "calibrating"
    FULL_BACKPROP = "full_backprop"
    STORE_INPUT = "store_input"
    FROZEN = "frozen"


_PLAIN_MODES = (LayerMode.FULL_BACKPROP, LayerMode.STORE_INPUT)


class CompressedLayer(nn.Module):
    """Mixin for compressed versions of a plain layer type (``plain_type``).

    The compressed module *is* an instance of the plain type and shares its Parameters, so
    optimizers, ``isinstance`` checks and state_dict keys keep working; the method lives in the
    ``compressor`` submodule (its factors are buffers).
    """

    plain_type: type[nn.Module]
    compressor: Compressor
    layer_name: str
    mode: LayerMode = LayerMode.COMPRESSED
    last_input_shape: Optional[tuple[int, ...]] = None    # prepared input (B, ...) of the last step
    layout: Optional[str] = None      # the activation view's layout, for layer types that have several

    @classmethod
    def from_module(cls, module: nn.Module, layer_name: str, method: str,
                    **options) -> "CompressedLayer":
        """Wrap ``module`` (sharing its Parameters) with compression ``method``."""
        layer = rebind(module, cls)
        layer.layer_name = layer_name
        layer.mode = LayerMode.COMPRESSED
        layer.last_input_shape = None
        layer._statistics = None
        layer._setup(**layer._layer_options(options))
        layer.compressor = build_compressor(method, layer_name, layer.activation_modes(), **options)
        layer.compressor.check_layer(layer)
        return layer

    def to_plain(self) -> nn.Module:
        """The plain module with the same Parameters, no compressor."""
        plain = rebind(self, self.plain_type)
        plain._modules.pop("compressor", None)
        for attr in ("layer_name", "mode", "last_input_shape", "_statistics", "conv_spec", "layout"):
            plain.__dict__.pop(attr, None)
        return plain

    # -- mode ----------------------------------------------------------------------------------
    def set_mode(self, mode: LayerMode) -> None:
        """Switch what the forward does (see :class:`LayerMode`). ``FROZEN`` turns the weight's
        ``requires_grad`` off, leaving it turns it back on. Calibration has its own pair,
        :meth:`begin_calibration` / :meth:`end_calibration`."""
        if not isinstance(mode, LayerMode):
            raise TypeError(f"layer {self.layer_name!r}: mode must be a LayerMode, got {mode!r}")
        if mode is LayerMode.CALIBRATING:
            raise ValueError(f"layer {self.layer_name!r}: start calibrating with "
                             f"begin_calibration(statistics) (lance_cl.Calibration does)")
        if mode is LayerMode.FROZEN:
            self.weight.requires_grad_(False)
        elif self.mode is LayerMode.FROZEN:
            self.weight.requires_grad_(True)
        self.mode = mode
        self._statistics = None

    def begin_calibration(self, statistics: CalibrationStatistics) -> None:
        """Plain forwards from now on; each input's activation view goes to ``statistics``."""
        self.mode = LayerMode.CALIBRATING
        self._statistics = statistics

    def end_calibration(self) -> None:
        """Back to the compressed forward; the statistics stay with their owner."""
        self.mode = LayerMode.COMPRESSED
        self._statistics = None

    # -- hooks for subclasses ----------------------------------------------------------------
    def _layer_options(self, options: dict) -> dict:
        """Pop the options that belong to the layer rather than the method (``layout`` is a
        conv option; other layer types have a single layout and ignore it)."""
        options.pop("layout", None)
        return {}

    def _setup(self) -> None:
        pass

    def activation_modes(self) -> Optional[int]:
        """Number of modes of the activation view, if known before the first input."""
        return None

    def prepare_input(self, x: Tensor) -> Tensor:
        """Layer input -> the tensor the compressed Function receives (conv: pre-padded)."""
        return x

    def activation_view(self, x: Tensor) -> Tensor:
        """Prepared input -> the tensor whose modes the method compresses."""
        return x

    def view_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Mode sizes of :meth:`activation_view` for a prepared input of ``shape``."""
        return tuple(shape)

    def plain_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def tucker_forward(self, x: Tensor, factors: list[Optional[Tensor]]) -> Tensor:
        """Forward through this layer type's Tucker Function: saves core and factors only."""
        raise NotImplementedError

    def frozen_forward(self, x: Tensor) -> Tensor:
        """Forward of a weight with requires_grad False (prepared input): same output and input
        gradient as the plain forward, but backward keeps only the weight, never x."""
        raise NotImplementedError

    def grad_weight_from(self, core: Tensor, factors: Sequence[Optional[Tensor]],
                         grad_output: Tensor) -> Tensor:
        """Weight gradient this layer's backward computes from ``core`` and ``factors``."""
        raise NotImplementedError

    @staticmethod
    def prepared_shape(module: nn.Module, shape: Sequence[int]) -> tuple[int, ...]:
        """The layer's input shape -> the shape its Function receives (conv: pre-padded)."""
        return tuple(shape)

    @staticmethod
    def dense_macs(module: nn.Module, shape: Sequence[int]) -> int:
        """Multiply-adds of one plain forward (= grad_input = grad_weight) for a prepared input
        of ``shape``; works on the plain module too."""
        raise NotImplementedError

    def tucker_macs(self, shape: Sequence[int], ranks: Sequence[Optional[int]]) -> tuple[int, int]:
        """(grad_weight MACs, projection MACs) of the Tucker path at ``ranks`` (None = kept)."""
        raise NotImplementedError

    # -- the forward switch ----------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        x = self.prepare_input(x)
        comp = self.compressor
        mode = self.mode
        if mode is LayerMode.CALIBRATING:
            self.last_input_shape = tuple(x.shape)
            with torch.no_grad():
                view = self.activation_view(x.detach())
                comp.bind(view.dim())
                self._statistics.update(view, comp.modes)
            return self.plain_forward(x)
        if mode in _PLAIN_MODES or not torch.is_grad_enabled():
            return self.plain_forward(x)
        if mode is LayerMode.FROZEN or not self.weight.requires_grad:
            return self.frozen_forward(x)
        self.last_input_shape = tuple(x.shape)
        return comp.layer_forward(self, x)
