"""Model-level API: choose layers, swap in compressed versions, calibrate, report (SPEC 3.5)."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .compressors import METHODS
from .core.budget import select_under_budget
from .core.conv2d import filter_blocks
from .core.tucker import project, tucker_bytes
from .layers import COMPRESSED_LAYERS, CompressedLayer, compressed_type_for
from .layers.swap import set_submodule

LayerSelector = Union[None, int, str, Sequence[str], type, tuple]
BUDGET_EPS_GRID = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


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
                         f"{_fmt_bytes(r.bytes_before):>10} {_fmt_bytes(r.bytes_after):>10} {ratio:>7}")
        return "\n".join(lines)


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


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
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            _call(model, example_inputs)
    finally:
        model.train(was_training)
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
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; choose one of {sorted(METHODS)}")
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
    comp = layer.compressor
    element = layer.weight.element_size()
    before = math.prod(shape) * element
    if comp.name == "vanilla":
        return before, before
    if comp.name == "gradient_filter":
        out_hw = layer.conv_spec.output_size(shape[2], shape[3], layer.kernel_size)
        rows, cols = filter_blocks(out_hw, comp.radius)
        return before, shape[0] * shape[1] * rows * cols * element
    view = layer.view_shape(torch.empty(shape, device="meta"))
    return before, tucker_bytes(view, comp.factor_shapes(), element)


def report(model: nn.Module) -> CompressionReport:
    """Current state of every compressed layer in ``model``."""
    rows = CompressionReport()
    for name, layer in compressed_layers(model).items():
        before, after = _activation_bytes(layer)
        shape = layer.last_input_shape
        rows.append(LayerReport(
            name=name, kind=layer.plain_type.__name__, method=layer.compressor.name,
            layout=getattr(layer, "layout", None), input_shape=shape,
            ranks=layer.compressor.ranks(), bytes_before=before, bytes_after=after))
    return rows


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _default_loss(output: Tensor, batch: Any) -> Tensor:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError("a byte budget chooses ranks from gradient errors: give calibrate() "
                         "batches of (inputs, targets) or a loss_fn(output, batch)")
    return F.cross_entropy(output, batch[1])


def _to_device(batch: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def calibrate(model: nn.Module, batches: Iterable[Any], num_batches: Optional[int] = None, *,
              forward: Callable[[nn.Module, Any], Any] = _default_forward,
              loss_fn: Callable[[Any, Any], Tensor] = _default_loss,
              device: Optional[torch.device] = None, progress: bool = True,
              finish: bool = True, batch_norm: str = "batch") -> CompressionReport:
    """One calibration pass: every compressed layer that needs it observes ``num_batches`` batches
    (default: all) in eval mode without gradients, then fixes its factors.

    ``batches`` yields inputs or (inputs, targets, ...) tuples (a DataLoader works). Layers with a
    byte ``budget`` then get their ranks from gradient errors measured on the first batch with
    ``loss_fn(forward(model, batch), batch)`` (default: cross-entropy on batch[1]).
    ``finish=False`` leaves the gathered Gram matrices in the layers for a caller that chooses
    its own subspaces (``layer.compressor.calibration_grams()`` then ``fix_factors(...)``).

    Dropout is off during calibration. ``batch_norm="batch"`` (default) normalises with batch
    statistics, as the training steps will (running statistics are left untouched);
    ``"running"`` uses the running statistics (eval mode), as for a fine-tuned pretrained model
    whose BatchNorm stays frozen.
    """
    if batch_norm not in ("batch", "running"):
        raise ValueError(f"batch_norm={batch_norm!r}: choose 'batch' or 'running'")
    layers = {n: l for n, l in compressed_layers(model).items() if l.compressor.needs_calibration}
    if not layers:
        return report(model)
    modes = {m: m.training for m in model.modules()}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved_stats = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    first = None
    seen = 0
    try:
        model.eval()
        if batch_norm == "batch":
            for m in norms:
                m.train()
        for layer in layers.values():
            layer.compressor.start_calibration()
        total = num_batches
        if total is None and hasattr(batches, "__len__"):
            total = len(batches)
        with torch.no_grad():
            for batch in tqdm(batches, total=total, desc="calibrating", disable=not progress,
                              leave=False):
                if num_batches is not None and seen >= num_batches:
                    break
                batch = _to_device(batch, device)
                if first is None:
                    first = batch
                forward(model, batch)
                seen += 1
        if seen == 0:
            raise ValueError("calibrate() got no batch: pass a non-empty iterable of batches")
        if finish:
            for layer in layers.values():
                layer.compressor.finish_calibration()
    finally:
        for layer in layers.values():
            layer.compressor.calibrating = False
        with torch.no_grad():
            for m, stats in zip(norms, saved_stats):
                for k, v in stats.items():
                    getattr(m, k).copy_(v)
        for m, training in modes.items():
            m.training = training
    if not finish:
        return report(model)
    budgeted = {n: l for n, l in layers.items() if getattr(l.compressor, "budget", None) is not None}
    if budgeted:
        _resolve_budgets(model, budgeted, first, forward, loss_fn)
    return report(model)


def _capture(model: nn.Module, layers: dict[str, CompressedLayer], batch: Any,
             forward: Callable, loss_fn: Callable) -> dict[str, tuple[Tensor, Tensor]]:
    """One plain forward/backward: each layer's activation view and grad_output."""
    captured: dict[str, list] = {n: [None, None] for n in layers}
    handles = []
    for name, layer in layers.items():
        layer.bypass = True

        def hook(module, inputs, output, name=name):
            captured[name][0] = module.activation_view(module.prepare_input(inputs[0].detach()))
            output.register_hook(lambda g, name=name: captured[name].__setitem__(1, g.detach()))
        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            loss = loss_fn(forward(model, batch), batch)
            params = [l.weight for l in layers.values() if l.weight.requires_grad]
            torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for layer in layers.values():
            layer.bypass = False
    return {n: (x, g) for n, (x, g) in captured.items()}


def _resolve_budgets(model: nn.Module, layers: dict[str, CompressedLayer], batch: Any,
                     forward: Callable, loss_fn: Callable) -> None:
    """Pick one eps per layer minimising summed ||dW - dW_tilde||_F under each byte budget."""
    captured = _capture(model, layers, batch, forward, loss_fn)
    groups: dict[float, list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault(layer.compressor.budget, []).append(name)
    for budget, names in groups.items():
        table = []
        for name in names:
            layer, (view, gy) = layers[name], captured[name]
            work = torch.promote_types(view.dtype, torch.float32)
            view, gy = view.to(work), gy.to(work)
            exact = layer.grad_weight_from(view, [None] * view.dim(), gy)
            options = []
            for eps in BUDGET_EPS_GRID:
                factors = [None if u is None else u.to(work)
                           for u in layer.compressor.factors_for_eps(eps)]
                approx = layer.grad_weight_from(project(view, factors), factors, gy)
                nbytes = tucker_bytes(view.shape, factors, layer.weight.element_size())
                options.append((nbytes, float(torch.linalg.vector_norm(exact - approx))))
            table.append(options)
        picks = select_under_budget(table, budget)
        for name, j in zip(names, picks):
            layers[name].compressor.finish_calibration(eps=BUDGET_EPS_GRID[j])
