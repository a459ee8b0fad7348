"""Model-level API: choose layers, swap in compressed versions, calibrate, report (docs/core.md)."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .units import format_bytes
from .calibration import Calibration, default_forward, default_loss
from .compressors import method_class
from .layers import COMPRESSED_LAYERS, CompressedLayer, compressed_type_for
from .layers.swap import set_submodule
from .train_modes import preserved_train_modes

LayerSelector = Union[None, int, str, Sequence[str], type, tuple]


@dataclass
class LayerReport:
    """One compressed layer: what it compresses and what it saves per step."""

    name: str
    kind: str
    method: str
    layout: Optional[str]
    input_shape: Optional[tuple[int, ...]]
    ranks: tuple[Optional[int], ...]
    bytes_before: Optional[int]
    bytes_after: Optional[int]

    @property
    def ratio(self) -> Optional[float]:
        if not self.bytes_before or not self.bytes_after:
            return None
        return self.bytes_before / self.bytes_after


class CompressionReport(list):
    """List of :class:`LayerReport` rows with a readable table as ``str()``."""

    def to_dicts(self) -> list[dict[str, Any]]:
        return [dict(asdict(r), ratio=r.ratio) for r in self]

    def __str__(self) -> str:
        head = f"{'layer':<28} {'type':<7} {'method':<15} {'input':<20} {'ranks':<22} " \
               f"{'before':>10} {'after':>10} {'ratio':>7}"
        lines = [head, "-" * len(head)]
        for r in self:
            ranks = ",".join("-" if k is None else str(k) for k in r.ranks) or "?"
            shape = "x".join(map(str, r.input_shape)) if r.input_shape else "?"
            ratio = f"{r.ratio:.1f}x" if r.ratio else "?"
            lines.append(f"{r.name:<28} {r.kind:<7} {r.method:<15} {shape:<20} {ranks:<22} "
                         f"{format_bytes(r.bytes_before, '?'):>10} {format_bytes(r.bytes_after, '?'):>10} {ratio:>7}")
        return "\n".join(lines)


def compressed_layers(model: nn.Module) -> dict[str, CompressedLayer]:
    """Name -> compressed layer, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLayer)}


def execution_order(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of compressible layers in the order one forward pass calls them (no grad)."""
    order: list[str] = []
    handles = []
    supported = tuple(COMPRESSED_LAYERS) + (CompressedLayer,)
    for name, module in model.named_modules():
        if isinstance(module, supported):
            handles.append(module.register_forward_pre_hook(
                lambda m, inp, name=name: order.append(name) if name not in order else None))
    try:
        with preserved_train_modes(model), torch.no_grad():
            model.eval()
            _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return order


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def select_layers(model: nn.Module, layers: LayerSelector = None,
                  example_inputs: Any = None) -> list[str]:
    """Resolve a layer selector to module names.

    ``None``: every Linear/Conv2d. ``int N``: the last N in execution order (needs
    ``example_inputs``). ``str`` / list of str: name globs. A type or tuple of types: every module
    of those types. Selecting a module type that cannot be compressed is an error.
    """
    named = dict(model.named_modules())
    supported = tuple(COMPRESSED_LAYERS)

    def compressible(name: str) -> bool:
        return isinstance(named[name], supported) or isinstance(named[name], CompressedLayer)

    if layers is None:
        return [n for n in named if n and compressible(n)]
    if isinstance(layers, bool):
        raise TypeError("layers= must be None, an int, a glob, a list of globs or module types")
    if isinstance(layers, int):
        if example_inputs is None:
            raise ValueError("layers=N (last N layers in execution order) needs example_inputs= "
                             "to trace one forward pass")
        order = execution_order(model, example_inputs)
        if layers < 1 or layers > len(order):
            raise ValueError(f"layers={layers}: the model has {len(order)} compressible layers")
        return order[-layers:]
    if isinstance(layers, type) or (isinstance(layers, tuple) and layers
                                    and all(isinstance(t, type) for t in layers)):
        types = layers if isinstance(layers, tuple) else (layers,)
        for t in types:
            if t not in COMPRESSED_LAYERS:
                compressed_type_for(t.__new__(t))  # raises the clear error
        return [n for n, m in named.items() if n and isinstance(m, types)]
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in named if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"layer pattern {pattern!r} matches no module; module names look like "
                             f"{[n for n in named if n][:6]}")
        for n in hits:
            if compressible(n):
                chosen.append(n)
            elif n == pattern:
                compressed_type_for(named[n])  # an exact name of an unsupported module: say so
            else:  # a glob over a container: take the compressible leaves under it
                chosen.extend(c for c in named if c.startswith(n + ".") and compressible(c))
    return list(dict.fromkeys(chosen))


def compress(model: nn.Module, method: str = "lance", layers: LayerSelector = None, *,
             example_inputs: Any = None, compact: Union[bool, dict] = False,
             **options) -> CompressionReport:
    """Swap the selected layers for compressed versions in place; returns the report.

    ``compact=True`` (or a dict of its options) also runs :func:`lance_cl.compact_activations`
    on the model, so the ops between the weight layers save compact tensors too.

    The compressed layers share the original Parameters (an existing optimizer keeps working).
    ``options`` go to the method: ``eps``, ``rank``, ``budget`` (bytes over all selected layers),
    ``compress_batch``, ``radius`` (gradient_filter), ``seed``, and ``layout`` ("tensor" or
    "patch", Conv2d). Layers already compressed are re-compressed with the new method.
    """
    method_class(method)          # an unknown method fails before any layer is touched
    names = select_layers(model, layers, example_inputs)
    if not names:
        raise ValueError("no Linear or Conv2d layer selected: nothing to compress")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, CompressedLayer):
            module = module.to_plain()
        cls = compressed_type_for(module)
        set_submodule(model, name, cls.from_module(module, name, method, **dict(options)))
    if compact:
        from .compact import compact_activations

        compact_activations(model, **(compact if isinstance(compact, dict) else {}))
    return report(model)


def uncompress(model: nn.Module) -> nn.Module:
    """Restore plain modules (same Parameters) everywhere; returns ``model``."""
    for name, layer in compressed_layers(model).items():
        set_submodule(model, name, layer.to_plain())
    return model


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` without compression buffers: loads into the plain model."""
    return {k: v for k, v in model.state_dict().items() if "compressor" not in k.split(".")}


def _activation_bytes(layer: CompressedLayer) -> tuple[Optional[int], Optional[int]]:
    """(bytes vanilla saves, bytes this layer saves) for its last seen input, analytically."""
    shape = layer.last_input_shape
    if shape is None:
        return None, None
    return math.prod(shape) * layer.weight.element_size(), layer.compressor.saved_bytes(layer, shape)


def report(model: nn.Module) -> CompressionReport:
    """Current state of every compressed layer in ``model``."""
    rows = CompressionReport()
    for name, layer in compressed_layers(model).items():
        before, after = _activation_bytes(layer)
        shape = layer.last_input_shape
        rows.append(LayerReport(
            name=name, kind=layer.plain_type.__name__, method=layer.compressor.name,
            layout=layer.layout, input_shape=shape,
            ranks=layer.compressor.ranks(), bytes_before=before, bytes_after=after))
    return rows


def calibrate(model: nn.Module, batches: Iterable[Any], num_batches: Optional[int] = None, *,
              forward: Callable[[nn.Module, Any], Any] = default_forward,
              loss_fn: Callable[[Any, Any], Tensor] = default_loss,
              device: Optional[torch.device] = None, progress: bool = True,
              batch_norm: str = "batch") -> CompressionReport:
    """One calibration pass: every compressed layer that needs it observes ``num_batches`` batches
    (default: all) in eval mode without gradients, then fixes its factors.

    ``batches`` yields inputs or (inputs, targets, ...) tuples (a DataLoader works). Layers with a
    byte ``budget`` then get their ranks from gradient errors measured on the first batch with
    ``loss_fn(forward(model, batch), batch)`` (default: cross-entropy on batch[1]). A caller that
    chooses its own subspaces uses :class:`lance_cl.Calibration` directly (``grams`` then
    ``fix_factors``).

    Dropout is off during calibration. ``batch_norm="batch"`` (default) normalises with batch
    statistics, as the training steps will; ``"running"`` uses the running statistics (eval
    mode), as for a fine-tuned pretrained model whose BatchNorm stays frozen. BatchNorm running
    statistics, train modes and the RNG are left as they were, budget measurement included.
    """
    calibration = Calibration(model, forward=forward, batch_norm=batch_norm, device=device)
    if not calibration.layers:
        return report(model)
    calibration.run(batches, num_batches, progress=progress)
    calibration.finish(loss_fn)
    return report(model)
