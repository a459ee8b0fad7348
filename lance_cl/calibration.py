"""One calibration pass as one object: begin, observe batches, read the Grams, fix the factors.

::

    calib = Calibration(model)                    # every compressed layer whose method needs one
    calib.run(loader, num_batches=8)              # begin, observe each batch, end
    calib.grams("conv1")                          # {mode: X_(m) X_(m)^T summed over the batches}
    calib.fix_energy()                            # each layer's own eps / rank rule
    calib.fix_budget(loss_fn)                     # layers with a byte budget: ranks from gradient errors
    calib.fix_factors("fc", [None, u])            # or factors chosen by the caller (LanceCLPlugin)

While it observes, the model is in eval mode (dropout off) with BatchNorm on batch statistics
(``batch_norm="batch"``, as the training steps will normalise) or on its running statistics
(``"running"``); BatchNorm running statistics, every module's train mode and the global RNG are as
before afterwards; the budget's gradient measurement runs under the same conditions and
leaves the global RNG as it was. (Iterating the batches may draw random numbers, e.g. a
shuffling DataLoader: those draws are kept.)
What each layer gathers is its method's (:meth:`Compressor.calibration_statistics
<lance_cl.compressors.Compressor.calibration_statistics>`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compressors import CalibrationError, CalibrationStatistics
from .core.budget import select_under_budget
from .core.linalg import check_column_ratio, sorted_eigh
from .core.tucker import project, tucker_bytes
from .layers import CompressedLayer, LayerMode
from .progress import progress_bar
from .train_modes import preserved_buffers, preserved_train_modes

BUDGET_EPS_GRID = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BATCH_NORM_CHOICES = ("batch", "running")


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch[0])`` for (inputs, targets, ...) tuples, else ``model(batch)``."""
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def default_loss(output: Tensor, batch: Any) -> Tensor:
    """Cross-entropy of ``output`` against ``batch[1]``."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError("a byte budget chooses ranks from gradient errors: give calibrate() "
                         "batches of (inputs, targets) or a loss_fn(output, batch)")
    return F.cross_entropy(output, batch[1])


def to_device(batch: Any, device: Optional[torch.device]) -> Any:
    """Tensors of ``batch`` (a tensor or a tuple / list of them) moved to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


@contextlib.contextmanager
def calibration_conditions(model: nn.Module, batch_norm: str = "batch",
                           keep_rng: bool = False) -> Iterator[None]:
    """Eval mode, BatchNorm on batch statistics (``"batch"``) or running ones (``"running"``);
    on exit every module's mode and every BatchNorm buffer are restored, and with ``keep_rng``
    the global RNG state too (random numbers drawn inside do not advance it)."""
    if batch_norm not in BATCH_NORM_CHOICES:
        raise ValueError(f"batch_norm={batch_norm!r}: choose 'batch' or 'running'")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    cuda = sorted({b.device.index or 0 for b in model.parameters() if b.device.type == "cuda"})
    rng = torch.random.fork_rng(devices=cuda) if keep_rng else contextlib.nullcontext()
    with preserved_train_modes(model), preserved_buffers(norms), rng:
        model.eval()
        if batch_norm == "batch":
            for m in norms:
                m.train()
        yield


class Calibration:
    """A calibration pass over ``layers`` of ``model`` (default: every compressed layer whose
    method needs calibration), then the choice of their factors.

    ``forward(model, batch)`` runs the model on one batch (default: ``model(batch[0])`` for
    tuples); ``device``: where batches are moved first (None: as given). ``column_ratio``: each
    batch adds at most ceil(ratio * n) columns, sampled, to a layer's mode-n Gram (a conv's
    patches give far more columns per batch than its Grams need); None: every column.
    ``modes``: per layer name, the only modes whose Grams it gathers (default: every mode the
    layer's method compresses); a mode left out gets no factor from :meth:`fix_energy`.
    """

    def __init__(self, model: nn.Module, layers: Optional[Mapping[str, CompressedLayer]] = None, *,
                 forward: Callable[[nn.Module, Any], Any] = default_forward,
                 batch_norm: str = "batch", device: Optional[torch.device] = None,
                 column_ratio: Optional[float] = None,
                 modes: Optional[Mapping[str, Sequence[int]]] = None) -> None:
        if batch_norm not in BATCH_NORM_CHOICES:
            raise ValueError(f"batch_norm={batch_norm!r}: choose 'batch' or 'running'")
        self.column_ratio = check_column_ratio(column_ratio)
        self.modes = {n: tuple(m) for n, m in (modes or {}).items()}
        if layers is None:
            layers = {n: m for n, m in model.named_modules()
                      if isinstance(m, CompressedLayer) and m.compressor.needs_calibration}
        self.model, self.layers = model, dict(layers)
        self.forward, self.batch_norm, self.device = forward, batch_norm, device
        self.first_batch: Any = None
        self.num_batches = 0
        self._statistics: dict[str, CalibrationStatistics] = {}
        self._eigen: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
        self._conditions: Optional[contextlib.ExitStack] = None

    # -- observing -------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True between :meth:`begin` and :meth:`end`."""
        return self._conditions is not None

    def begin(self) -> None:
        """Fresh statistics for every layer; the model goes into calibration conditions."""
        if self.active:
            raise CalibrationError("Calibration.begin() called twice without end()")
        self._statistics = {n: l.compressor.calibration_statistics(self.column_ratio)
                            for n, l in self.layers.items()}
        for name, modes in self.modes.items():
            self._stats(name).restrict_modes(modes)
        self._eigen, self.first_batch, self.num_batches = {}, None, 0
        stack = contextlib.ExitStack()
        stack.enter_context(calibration_conditions(self.model, self.batch_norm))
        self._conditions = stack
        for name, layer in self.layers.items():
            layer.begin_calibration(self._statistics[name])

    def observe(self, batch: Any) -> None:
        """Run one batch through the model without gradients; every layer records its view."""
        if not self.active:
            raise CalibrationError("Calibration.observe() needs begin() first")
        batch = to_device(batch, self.device)
        if self.first_batch is None:
            self.first_batch = batch
        with torch.no_grad():
            self.forward(self.model, batch)
        self.num_batches += 1

    def end(self) -> None:
        """Layers back to their compressed forward, model back to its modes and statistics."""
        if not self.active:
            return
        for layer in self.layers.values():
            layer.end_calibration()
        stack, self._conditions = self._conditions, None
        stack.close()

    def __enter__(self) -> "Calibration":
        self.begin()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end()

    def run(self, batches: Iterable[Any], num_batches: Optional[int] = None,
            progress: bool = True) -> "Calibration":
        """begin, observe the first ``num_batches`` of ``batches`` (default: all), end."""
        total = num_batches
        if total is None and hasattr(batches, "__len__"):
            total = len(batches)
        with self:
            for batch in progress_bar(batches, total=total, desc="calibrating", disable=not progress,
                                      leave=False):
                if num_batches is not None and self.num_batches >= num_batches:
                    break
                self.observe(batch)
        if self.num_batches == 0:
            raise ValueError("calibrate() got no batch: pass a non-empty iterable of batches")
        return self

    # -- what was gathered -----------------------------------------------------------------------
    def grams(self, name: str) -> dict[int, Tensor]:
        """Gram matrix per compressed mode of layer ``name``: mode -> (n_m, n_m)."""
        grams = self._stats(name).grams()
        if not grams:
            raise CalibrationError(f"layer {name!r} saw no calibration batch (the forward never "
                                   f"reached it); check forward= and the batches")
        return grams

    def columns(self, name: str) -> dict[int, int]:
        """Per mode of layer ``name``: the columns its Gram sums, a bound on the Gram's rank
        ({} where the method's statistics do not count them)."""
        self.grams(name)
        return self._stats(name).columns()

    def shape(self, name: str) -> tuple[int, ...]:
        """Per-sample shape of layer ``name``'s activation view during calibration."""
        self.grams(name)
        return self._stats(name).shape

    def eigen(self, name: str) -> dict[int, tuple[Tensor, Tensor]]:
        """Per compressed mode: (eigenvalues descending, eigenvectors) of the Gram."""
        if name not in self._eigen:
            self._eigen[name] = {m: sorted_eigh(g) for m, g in self.grams(name).items()}
        return self._eigen[name]

    def _stats(self, name: str) -> CalibrationStatistics:
        if name not in self.layers:
            raise KeyError(f"layer {name!r} is not calibrated here; layers: {sorted(self.layers)}")
        if name not in self._statistics:
            raise CalibrationError("nothing observed yet: call begin() and observe(batch) first")
        return self._statistics[name]

    # -- fixing the factors ----------------------------------------------------------------------
    def fix_factors(self, name: str, factors: Sequence[Optional[Tensor]],
                    eps: Optional[float] = None) -> None:
        """Layer ``name`` uses ``factors`` (one (n_m, r_m) or None per mode) from now on."""
        if self.active:
            raise CalibrationError("fix the factors after end() (the model is still observing)")
        self.layers[name].compressor.fix_factors(factors, self.shape(name), eps)

    def fix_energy(self, names: Optional[Sequence[str]] = None, eps: Optional[float] = None) -> None:
        """Factors from each layer's own rule (its ``rank``, else its ``eps``), or from the
        energy rule ``eps`` when given; default: every layer without a byte budget."""
        if names is None:
            names = [n for n, l in self.layers.items() if l.compressor.budget is None]
        for name in names:
            comp = self.layers[name].compressor
            self.fix_factors(name, comp.energy_factors(self.eigen(name), eps), eps)

    def fix_budget(self, loss_fn: Callable[[Any, Any], Tensor] = default_loss,
                   batch: Any = None) -> None:
        """Layers with a byte budget: one eps per layer from :data:`BUDGET_EPS_GRID` minimising
        the summed ||dW - dW_tilde||_F of the layers sharing a budget, under that budget.

        The exact gradients come from one plain forward / backward of ``batch`` (default: the
        first observed batch) under calibration conditions: BatchNorm statistics, train modes
        and the RNG are untouched."""
        budgeted = {n: l for n, l in self.layers.items() if l.compressor.budget is not None}
        if not budgeted:
            return
        batch = self.first_batch if batch is None else to_device(batch, self.device)
        with calibration_conditions(self.model, self.batch_norm, keep_rng=True):
            captured = self._capture(budgeted, batch, loss_fn)
        groups: dict[float, list[str]] = {}
        for name, layer in budgeted.items():
            groups.setdefault(layer.compressor.budget, []).append(name)
        for budget, names in groups.items():
            table = [self._budget_options(name, *captured[name]) for name in names]
            for name, j in zip(names, select_under_budget(table, budget)):
                eps = BUDGET_EPS_GRID[j]
                self.fix_factors(name, self.layers[name].compressor.energy_factors(self.eigen(name), eps),
                                 eps)

    def finish(self, loss_fn: Callable[[Any, Any], Tensor] = default_loss) -> None:
        """:meth:`fix_energy` for the layers without a budget, :meth:`fix_budget` for the others."""
        self.fix_energy()
        self.fix_budget(loss_fn)

    def _budget_options(self, name: str, view: Tensor, gy: Tensor) -> list[tuple[int, float]]:
        """(bytes, gradient error) of each eps of the grid for one layer."""
        layer = self.layers[name]
        work = torch.promote_types(view.dtype, torch.float32)
        view, gy = view.to(work), gy.to(work)
        exact = layer.grad_weight_from(view, [None] * view.dim(), gy)
        options = []
        for eps in BUDGET_EPS_GRID:
            factors = [None if u is None else u.to(work)
                       for u in layer.compressor.energy_factors(self.eigen(name), eps)]
            approx = layer.grad_weight_from(project(view, factors), factors, gy)
            nbytes = tucker_bytes(view.shape, factors, layer.weight.element_size())
            options.append((nbytes, float(torch.linalg.vector_norm(exact - approx))))
        return options

    def _capture(self, layers: dict[str, CompressedLayer], batch: Any,
                 loss_fn: Callable) -> dict[str, tuple[Tensor, Tensor]]:
        """One plain forward / backward: each layer's activation view and grad_output."""
        captured: dict[str, list] = {n: [None, None] for n in layers}
        previous = {n: layer.mode for n, layer in layers.items()}
        handles = []
        for name, layer in layers.items():
            layer.set_mode(LayerMode.FULL_BACKPROP)

            def hook(module, inputs, output, name=name):
                captured[name][0] = module.activation_view(module.prepare_input(inputs[0].detach()))
                output.register_hook(lambda g, name=name: captured[name].__setitem__(1, g.detach()))
            handles.append(layer.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                loss = loss_fn(self.forward(self.model, batch), batch)
                params = [l.weight for l in layers.values() if l.weight.requires_grad]
                torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            for name, layer in layers.items():
                layer.set_mode(previous[name])
        return {n: (x, g) for n, (x, g) in captured.items()}
