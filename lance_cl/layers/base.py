"""What every compressed layer shares: construction around an existing module, the forward switch
between calibration, plain and compressed paths, and conversion back to the plain module."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..compressors import Compressor, build_compressor
from ..core.frozen import frozen_conv2d, frozen_linear
from .swap import rebind


class CompressedLayer(nn.Module):
    """Mixin for compressed versions of a plain layer type (``plain_type``).

    The compressed module *is* an instance of the plain type and shares its Parameters, so
    optimizers, ``isinstance`` checks and state_dict keys keep working; the method lives in the
    ``compressor`` submodule (its factors are buffers).
    """

    plain_type: type[nn.Module]
    compressor: Compressor
    layer_name: str
    bypass: bool = False          # True: behave exactly like the plain module (used to measure)
    # A weight with requires_grad False takes ``frozen_forward`` (unless ``bypass``): nothing of
    # the input is saved for backward, grad_input stays exact.
    last_input_shape: Optional[tuple[int, ...]] = None

    @classmethod
    def from_module(cls, module: nn.Module, layer_name: str, method: str,
                    **options) -> "CompressedLayer":
        """Wrap ``module`` (sharing its Parameters) with compression ``method``."""
        layer = rebind(module, cls)
        layer.layer_name = layer_name
        layer.bypass = False
        layer.last_input_shape = None
        layer._setup(**layer._layer_options(options))
        layer.compressor = build_compressor(method, layer_name, layer.activation_modes(), **options)
        layer._check_method()
        return layer

    def to_plain(self) -> nn.Module:
        """The plain module with the same Parameters, no compressor."""
        plain = rebind(self, self.plain_type)
        plain._modules.pop("compressor", None)
        for attr in ("layer_name", "bypass", "last_input_shape", "conv_spec", "layout"):
            plain.__dict__.pop(attr, None)
        return plain

    # -- hooks for subclasses ----------------------------------------------------------------
    def _layer_options(self, options: dict) -> dict:
        """Pop the options that belong to the layer rather than the method (``layout`` is a
        conv option; other layer types have a single layout and ignore it)."""
        options.pop("layout", None)
        return {}

    def _setup(self) -> None:
        pass

    def _check_method(self) -> None:
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

    def view_shape(self, x: Tensor) -> Sequence[int]:
        return self.activation_view(x).shape

    def plain_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def compressed_forward(self, x: Tensor, factors: list[Optional[Tensor]]) -> Tensor:
        raise NotImplementedError

    def frozen_forward(self, x: Tensor) -> Tensor:
        """Forward of a weight with requires_grad False (prepared input): same output and input
        gradient as the plain forward, but backward keeps only the weight, never x."""
        if isinstance(self, nn.Conv2d):
            s = self.conv_spec                  # x is pre-padded: the spec's padding is symmetric
            return frozen_conv2d(x, self.weight, self.bias, s.stride, s.padding, s.dilation,
                                 s.groups)
        if isinstance(self, nn.Linear):
            return frozen_linear(x, self.weight, self.bias)
        return self.plain_forward(x)

    def grad_weight_from(self, core: Tensor, factors: Sequence[Optional[Tensor]],
                         grad_output: Tensor) -> Tensor:
        """Weight gradient this layer's backward computes from ``core`` and ``factors``."""
        raise NotImplementedError

    # -- the forward switch ----------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        x = self.prepare_input(x)
        comp = self.compressor
        if comp.calibrating:
            self.last_input_shape = tuple(x.shape)
            with torch.no_grad():
                view = self.activation_view(x.detach())
                comp.bind(view.dim())
                comp.observe(view)
            return self.plain_forward(x)
        if self.bypass or not torch.is_grad_enabled():
            return self.plain_forward(x)
        if not self.weight.requires_grad:
            return self.frozen_forward(x)
        self.last_input_shape = tuple(x.shape)
        if comp.name == "vanilla":
            return self.plain_forward(x)
        with torch.no_grad():
            if comp.reads_activation:
                view = self.activation_view(x.detach())
            else:
                view = torch.empty(self.view_shape(x), dtype=x.dtype, device="meta")
            comp.bind(view.dim())
            factors = comp.step_factors(view)
        return self.compressed_forward(x, factors)
