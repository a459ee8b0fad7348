"""The compression methods: one object per method and per layer, behind one registry (docs/core.md).

A method object lives inside a compressed layer (``layer.compressor``) and owns everything that
depends on the method: which layer types it supports, its training forward (which autograd
Function runs), which factor (n_m, r_m), or None, it uses for each mode of the layer's activation
view, the bytes it saves and the FLOPs it costs for an input shape, what its calibration gathers,
and how ``lance-cl bench`` runs it. Nothing outside this registry branches on a method's name: a
new method is one class decorated with :func:`register_method` (it may live in any file). All
linear algebra comes from :mod:`lance_cl.core.linalg`.

=================  =================================================  ==================
method             subspace                                           per-step cost
=================  =================================================  ==================
vanilla            none: the layer saves x                            0
lance              Gram matrices over N calibration batches, one      projection only
                   eigendecomposition, factors fixed afterwards
asi                one warm-started subspace iteration per mode per    low
                   step, ranks fixed at calibration (eps or budget)
hosvd              truncated HOSVD of every mode, every step (eps)    very high
gradient_filter    R x R block means of x and grad_output (Conv2d)    low
=================  =================================================  ==================
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn

from .core.conv2d import GradientFilterConv2dFunction, filter_blocks
from .core.linalg import (GramAccumulator, check_column_ratio, check_eps, energy_rank, mode_basis,
                          mode_gram, random_orthonormal, subspace_iteration)
from .core.tucker import compact, tucker_bytes

if TYPE_CHECKING:
    from .layers.base import CompressedLayer

METHODS: dict[str, type["Compressor"]] = {}
"""Registered methods by name, in registration order (the order ``lance-cl bench`` runs them)."""


class CalibrationError(RuntimeError):
    """A compressed layer was used in a way its calibration state does not allow."""


def register_method(cls: type["Compressor"]) -> type["Compressor"]:
    """Class decorator adding a method to :data:`METHODS` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute name = '...' to be registered")
    METHODS[cls.name] = cls
    return cls


def build_compressor(method: str, layer_name: str, n_modes: Optional[int] = None,
                     **options) -> "Compressor":
    """Instantiate a registered method for one layer whose activation view has ``n_modes`` modes."""
    return method_class(method)(layer_name=layer_name, n_modes=n_modes, **options)


def method_class(method: str) -> type["Compressor"]:
    """The registered class of ``method``, or a clear error listing the registered ones."""
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]


class CalibrationStatistics:
    """What a calibration pass gathers for one layer, batch by batch (see :class:`Calibration
    <lance_cl.calibration.Calibration>`): Gram matrices per compressed mode.

    ``shape`` is the activation view's per-sample shape (view.shape[1:]) of the first batch.
    """

    def __init__(self, layer_name: str, method: str) -> None:
        self.layer_name, self.method = layer_name, method
        self.num_batches = 0
        self.shape: Optional[tuple[int, ...]] = None
        self.only_modes: Optional[frozenset[int]] = None

    def restrict_modes(self, modes: Sequence[int]) -> None:
        """Gather only these of the modes the method compresses (the caller needs no others)."""
        self.only_modes = frozenset(int(m) for m in modes)

    def selected(self, modes: Sequence[int]) -> tuple[int, ...]:
        """The modes of ``modes`` to gather (all of them unless :meth:`restrict_modes` ran)."""
        return tuple(m for m in modes if self.only_modes is None or m in self.only_modes)

    def update(self, view: Tensor, modes: Sequence[int]) -> None:
        """One batch's activation view (B, ...) with the modes the method compresses."""
        raise NotImplementedError

    def grams(self) -> dict[int, Tensor]:
        """Gram matrix X_(m) X_(m)^T per compressed mode m ({} before the first batch)."""
        raise NotImplementedError

    def columns(self) -> dict[int, int]:
        """Per mode, how many columns of the unfoldings its Gram sums (a bound on its rank);
        {} where the statistics do not count them."""
        return {}

    def _check_shape(self, view: Tensor) -> None:
        if self.shape is None:
            self.shape = tuple(view.shape[1:])
        elif tuple(view.shape[1:]) != self.shape:
            raise CalibrationError(
                f"layer {self.layer_name!r} ({self.method}) was calibrated for activations of shape "
                f"(*, {', '.join(map(str, self.shape))}) but got {tuple(view.shape)}; calibrate "
                f"again with lance_cl.calibrate(model, batches) on inputs of the training size")


class SummedGrams(CalibrationStatistics):
    """Grams summed over every calibration batch (every batch must have the same shape);
    ``column_ratio``: each batch adds at most ceil(ratio * n) sampled columns to a mode-n Gram
    (:class:`~lance_cl.core.linalg.GramAccumulator`)."""

    def __init__(self, layer_name: str, method: str, column_ratio: Optional[float] = None) -> None:
        super().__init__(layer_name, method)
        self.column_ratio = check_column_ratio(column_ratio)
        self._sum: Optional[GramAccumulator] = None

    def update(self, view: Tensor, modes: Sequence[int]) -> None:
        self._check_shape(view)
        if self._sum is None:
            self._sum = GramAccumulator(self.selected(modes), self.column_ratio)
        self._sum.update(view)
        self.num_batches += 1

    def grams(self) -> dict[int, Tensor]:
        return {} if self._sum is None else dict(self._sum.grams)

    def columns(self) -> dict[int, int]:
        return {} if self._sum is None else dict(self._sum.columns)


class FirstBatchGrams(CalibrationStatistics):
    """Grams of the first calibration batch only (later batches are ignored)."""

    def __init__(self, layer_name: str, method: str) -> None:
        super().__init__(layer_name, method)
        self._grams: dict[int, Tensor] = {}

    def update(self, view: Tensor, modes: Sequence[int]) -> None:
        if self.num_batches == 0:
            self._check_shape(view)
            self._grams = {m: mode_gram(view, m) for m in self.selected(modes)}
        self.num_batches += 1

    def grams(self) -> dict[int, Tensor]:
        return dict(self._grams)


class Compressor(nn.Module):
    """Base class of the methods. Subclasses say which factors to use and what that costs.

    Factors are buffers named ``factor_<mode>``, so ``state_dict`` round-trips them even when
    their shapes were unknown when the module was built.

    Class attributes a method sets: ``name``; ``supported_layers`` (plain layer types);
    ``needs_calibration`` (factors come from a calibration pass, see ``calibration_statistics``);
    ``uses_factors``; ``reads_activation`` (False: ``step_factors`` needs only the view's shape);
    and how ``lance-cl bench`` runs it: ``bench_options`` (BenchConfig fields passed as method
    options of the same name), ``bench_calibration`` (the BenchConfig field giving its number of
    calibration batches; None: 1 batch when it needs calibration), ``bench_variants`` (the
    compaction suffixes it is offered with) and ``bench_default_variants`` (those run by
    default, "" = the method alone).
    """

    name: ClassVar[str] = ""
    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.Conv2d, nn.Linear)
    needs_calibration: ClassVar[bool] = False
    uses_factors: ClassVar[bool] = True
    reads_activation: ClassVar[bool] = True
    bench_options: ClassVar[tuple[str, ...]] = ()
    bench_calibration: ClassVar[Optional[str]] = None
    bench_variants: ClassVar[tuple[str, ...]] = ("+compact",)
    bench_default_variants: ClassVar[tuple[str, ...]] = ("",)
    eps: Optional[float] = None            # energy kept per mode (methods with an energy rule)
    fixed_rank: Optional[int | Sequence[int]] = None
    budget: Optional[float] = None         # bytes shared by the layers of one budget

    def __init__(self, layer_name: str, n_modes: Optional[int] = None, compress_batch: bool = False,
                 **unused):
        super().__init__()
        if unused:
            raise TypeError(f"method {self.name!r} got unexpected options {sorted(unused)} "
                            f"(layer {layer_name!r})")
        self.layer_name = layer_name
        self.compress_batch = bool(compress_batch)
        self.register_buffer("calibrated_shape", torch.zeros(0, dtype=torch.long))
        self.batch_fallbacks = 0     # steps where a fixed batch factor did not fit the batch size
        self.last_ranks: Optional[tuple[Optional[int], ...]] = None
        self.last_factor_shapes: Optional[list[Optional[tuple[int, int]]]] = None
        self.n_modes: Optional[int] = None
        self.modes: tuple[int, ...] = ()
        if n_modes is not None:
            self.bind(n_modes)

    def bind(self, n_modes: int) -> None:
        """Fix the number of activation modes (a Linear learns it from its first input)."""
        if self.n_modes == n_modes:
            return
        if self.n_modes is not None:
            raise CalibrationError(
                f"layer {self.layer_name!r} was set up for {self.n_modes}-mode activations but got "
                f"{n_modes} modes; the input rank of a compressed layer cannot change")
        self.n_modes = n_modes
        self.modes = tuple(range(0 if self.compress_batch else 1, n_modes))
        for m in range(n_modes):
            if f"factor_{m}" not in self._buffers:
                self.register_buffer(f"factor_{m}", None)

    # -- which layers ----------------------------------------------------------------------------
    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this method can compress ``module`` (a plain or compressed layer)."""
        return isinstance(module, cls.supported_layers)

    def check_layer(self, layer: "CompressedLayer") -> None:
        """Raise a clear error when this method cannot compress ``layer`` as configured."""
        if self.supports(layer):
            return
        kinds = " and ".join(t.__name__ for t in self.supported_layers)
        kind = layer.plain_type.__name__
        others = [n for n, c in METHODS.items() if isinstance(layer, c.supported_layers)]
        raise ValueError(f"layer {self.layer_name!r}: {self.name} applies to {kinds} only; choose "
                         f"{', '.join(others) or 'another method'} for {kind} layers (or select only "
                         f"{kinds} layers)")

    # -- factors -------------------------------------------------------------------------------
    def factor(self, mode: int) -> Optional[Tensor]:
        return getattr(self, f"factor_{mode}")

    def set_factor(self, mode: int, value: Optional[Tensor]) -> None:
        # Rebind rather than copy in place: a factor saved for an earlier backward stays valid.
        self._buffers[f"factor_{mode}"] = None if value is None else compact(value)

    def factors(self) -> list[Optional[Tensor]]:
        return [self.factor(m) for m in range(self.n_modes or 0)]

    @property
    def is_calibrated(self) -> bool:
        return self.calibrated_shape.numel() > 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Factor shapes are only known after calibration: adopt the stored shapes.
        shape = state_dict.get(prefix + "calibrated_shape")
        if self.n_modes is None and shape is not None and shape.numel() > 0:
            self.bind(shape.numel() + 1)
        for name in list(self._buffers):
            key = prefix + name
            if key in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- the training step -----------------------------------------------------------------------
    def layer_forward(self, layer: "CompressedLayer", x: Tensor) -> Tensor:
        """The training forward of ``layer`` under this method. x: the prepared input.

        Default: this step's factors (from the view, or only its shape when ``reads_activation``
        is False) through the layer type's Tucker Function."""
        self.bind(len(layer.view_shape(x.shape)))
        with torch.no_grad():
            if self.reads_activation:
                view = layer.activation_view(x.detach())
            else:
                view = torch.empty(layer.view_shape(x.shape), dtype=x.dtype, device="meta")
            factors = self.step_factors(view)
        return layer.tucker_forward(x, factors)

    def step_factors(self, view: Tensor) -> list[Optional[Tensor]]:
        """Factors to compress this step's activation view (B, ...). Runs under no_grad.

        ``view`` may be a meta tensor (shape and dtype only) for methods with
        ``reads_activation = False``."""
        raise NotImplementedError

    # -- costs ---------------------------------------------------------------------------------
    def saved_bytes(self, layer: "CompressedLayer", shape: Sequence[int]) -> int:
        """Bytes the layer's backward keeps for a prepared input of ``shape`` at the current
        ranks (default: Tucker core + factors of the activation view)."""
        return tucker_bytes(layer.view_shape(shape), self.factor_shapes(), layer.weight.element_size())

    def step_macs(self, layer: "CompressedLayer", shape: Sequence[int]) -> tuple[int, int]:
        """(grad_weight MACs, compression MACs) of one step for a prepared input of ``shape``:
        compression = projection onto the factors plus this step's decompositions."""
        grad_w, projection = layer.tucker_macs(shape, list(self.ranks()))
        return grad_w, projection + self.decomposition_macs(layer.view_shape(shape))

    def decomposition_macs(self, view: Sequence[int]) -> int:
        """MACs of the per-step decompositions for an activation view of ``view`` (fixed
        subspaces: 0)."""
        return 0

    # -- calibration (methods with needs_calibration) ----------------------------------------------
    def calibration_statistics(self, column_ratio: Optional[float] = None) -> CalibrationStatistics:
        """A fresh statistics object for one calibration pass of this layer. ``column_ratio``:
        the most columns per batch a Gram may sample, as a multiple of its size (methods that
        sum Grams over batches; None: every column)."""
        raise CalibrationError(f"method {self.name!r} (layer {self.layer_name!r}) has no calibration")

    def _rank_for(self, mode: int, eigenvalues: Tensor, eps: Optional[float] = None) -> int:
        if eps is None and self.fixed_rank is not None:
            r = self.fixed_rank if isinstance(self.fixed_rank, int) else self.fixed_rank[mode]
            return max(1, min(int(r), eigenvalues.numel()))
        return energy_rank(eigenvalues, self.eps if eps is None else eps)

    def energy_factors(self, eigen: dict[int, tuple[Tensor, Tensor]],
                       eps: Optional[float] = None) -> list[Optional[Tensor]]:
        """Factors the rule of this layer (``rank``, else ``eps``), or the energy rule ``eps``
        when given, picks from (eigenvalues descending, eigenvectors) per compressed mode."""
        out: list[Optional[Tensor]] = [None] * self.n_modes
        for m, (lam, vec) in eigen.items():
            out[m] = compact(vec[:, : self._rank_for(m, lam, eps)])
        return out

    def fix_factors(self, factors: Sequence[Optional[Tensor]], calibrated_shape: Sequence[int],
                    eps: Optional[float] = None) -> None:
        """Use these factors (one (n_m, r_m) or None per mode) from now on, for activation views
        of per-sample shape ``calibrated_shape``; ``eps``: the energy rule that chose them."""
        if self.n_modes is None:
            self.bind(len(calibrated_shape) + 1)
        if len(factors) != self.n_modes:
            raise ValueError(f"layer {self.layer_name!r}: {len(factors)} factors given for "
                             f"{self.n_modes} modes (one (n_m, r_m) tensor or None per mode)")
        for m, u in enumerate(factors):
            self.set_factor(m, u)
        self.calibrated_shape = torch.tensor(list(calibrated_shape), dtype=torch.long)
        if eps is not None:
            self.eps = eps
        self._factors_fixed(list(factors))

    def _factors_fixed(self, factors: list[Optional[Tensor]]) -> None:
        """Hook run once the factors are fixed."""

    # -- report --------------------------------------------------------------------------------
    def factor_shapes(self) -> list[Optional[tuple[int, int]]]:
        """(n_m, r_m) of the factors the last step used (fixed or per-step), None if kept."""
        if self.last_factor_shapes is not None:
            return list(self.last_factor_shapes)
        return [None if u is None else tuple(u.shape) for u in self.factors()]

    def ranks(self) -> tuple[Optional[int], ...]:
        """Rank per mode (None = mode kept at full size), from the current factors."""
        if self.last_ranks is not None:
            return self.last_ranks
        return tuple(None if u is None else int(u.shape[1]) for u in self.factors())

    def extra_repr(self) -> str:
        return f"layer={self.layer_name!r}, modes={self.modes}"

    def _check_shape(self, view: Tensor) -> None:
        expected = tuple(self.calibrated_shape.tolist())
        got = tuple(view.shape[1:])
        if expected != got:
            raise CalibrationError(
                f"layer {self.layer_name!r} ({self.name}) was calibrated for activations of shape "
                f"(*, {', '.join(map(str, expected))}) but got {tuple(view.shape)}; calibrate again "
                f"with lance_cl.calibrate(model, batches) on inputs of the training size")

    def _require_calibration(self) -> None:
        if not self.is_calibrated:
            raise CalibrationError(
                f"layer {self.layer_name!r} uses method {self.name!r}, which needs a calibration "
                f"pass before training: call lance_cl.calibrate(model, batches, num_batches=...) "
                f"after lance_cl.compress(...)")


@register_method
class Vanilla(Compressor):
    """No compression: the layer saves its input as plain autograd would."""

    name = "vanilla"
    uses_factors = False
    reads_activation = False
    bench_variants = ("+compact", "+compact_nostem", "+compact_keep", "+compact_bf16",
                      "+compact_int8")
    bench_default_variants = ("", "+compact", "+compact_bf16")

    def step_factors(self, view: Tensor) -> list[Optional[Tensor]]:
        return [None] * self.n_modes

    def layer_forward(self, layer: "CompressedLayer", x: Tensor) -> Tensor:
        return layer.plain_forward(x)

    def saved_bytes(self, layer: "CompressedLayer", shape: Sequence[int]) -> int:
        return math.prod(shape) * layer.weight.element_size()

    def step_macs(self, layer: "CompressedLayer", shape: Sequence[int]) -> tuple[int, int]:
        return layer.dense_macs(layer, shape), 0


class _EnergyOrBudget(Compressor):
    """Shared options of methods whose ranks come from an energy threshold or a byte budget."""

    needs_calibration = True
    bench_options = ("eps",)

    def __init__(self, layer_name: str, n_modes: int, eps: Optional[float] = None,
                 rank: Optional[int | Sequence[int]] = None, budget: Optional[float] = None,
                 compress_batch: bool = False, seed: int = 0, **unused):
        super().__init__(layer_name, n_modes, compress_batch, **unused)
        given = [o for o, v in (("eps", eps), ("rank", rank), ("budget", budget)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"layer {layer_name!r}: give only one of eps=, rank=, budget= (got {given})")
        if not given:
            eps = 0.7
        self.eps = None if eps is None else check_eps(eps)
        self.budget = None if budget is None else float(budget)
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"budget={budget!r} bytes must be positive")
        self.fixed_rank = rank
        self.generator = torch.Generator().manual_seed(int(seed))

    def _require_resolved(self) -> None:
        self._require_calibration()
        if all(self.factor(m) is None for m in self.modes):
            raise CalibrationError(f"layer {self.layer_name!r}: the byte budget was never resolved; "
                                   f"run lance_cl.calibrate(model, batches, loss_fn=...) so ranks "
                                   f"can be chosen from gradient errors")


@register_method
class Lance(_EnergyOrBudget):
    """LANCE: one-shot calibrated subspaces, fixed during training.

    Options: ``eps`` (energy kept per mode, default 0.7), ``rank`` (int or per-mode list),
    ``budget`` (bytes for all layers compressed together; resolved by :func:`lance_cl.calibrate`),
    ``compress_batch`` (published variant: a batch factor fixed at calibration, valid only for the
    calibration batch size; other sizes fall back to an uncompressed batch mode for that step).
    Calibration sums the Grams of every calibration batch.
    """

    name = "lance"
    reads_activation = False
    bench_calibration = "lance_calibration_batches"
    bench_variants = ("+compact", "+compact_nostem", "+compact_keep", "+compact_bf16",
                      "+compact_int8")
    bench_default_variants = ("", "+compact", "+compact_bf16")

    def calibration_statistics(self, column_ratio: Optional[float] = None) -> CalibrationStatistics:
        return SummedGrams(self.layer_name, self.name, column_ratio)

    def step_factors(self, view: Tensor) -> list[Optional[Tensor]]:
        self._require_resolved()
        self._check_shape(view)
        factors = [None if u is None else u.to(view.dtype) for u in self.factors()]
        if factors[0] is not None and factors[0].shape[0] != view.shape[0]:
            factors[0] = None  # published fixed batch factor only fits the calibration batch size
            self.batch_fallbacks += 1
        return factors


@register_method
class ASI(_EnergyOrBudget):
    """ASI (Nguyen et al., ICML 2025): one warm-started subspace iteration per mode per step.

    Ranks are fixed at calibration from the first calibration batch, by ``eps``, ``rank`` or a
    byte ``budget`` shared by the layers compressed together (knapsack over eps in 0.4..0.9).
    The calibration eigenvectors are the first warm start. By default the batch mode is
    compressed (as published); when the batch size changes its factor restarts from a random
    orthonormal matrix drawn from this layer's private generator.
    """

    name = "asi"
    bench_calibration = "asi_calibration_batches"

    def __init__(self, layer_name: str, n_modes: int, compress_batch: bool = True, **options):
        super().__init__(layer_name, n_modes, compress_batch=compress_batch, **options)
        self.register_buffer("rank_per_mode", torch.zeros(0, dtype=torch.long))

    def calibration_statistics(self, column_ratio: Optional[float] = None) -> CalibrationStatistics:
        return FirstBatchGrams(self.layer_name, self.name)     # one batch: every column

    def _factors_fixed(self, factors: list[Optional[Tensor]]) -> None:
        self.rank_per_mode = torch.tensor([0 if u is None else u.shape[1] for u in factors],
                                          dtype=torch.long)

    def step_factors(self, view: Tensor) -> list[Optional[Tensor]]:
        self._require_resolved()
        self._check_shape(view)
        out: list[Optional[Tensor]] = [None] * self.n_modes
        for m in self.modes:
            previous = self.factor(m)
            n = view.shape[m]
            r = min(int(self.rank_per_mode[m]), n)
            if previous is None or previous.shape[0] != n:
                previous = random_orthonormal(n, r, self.generator, view.dtype, view.device)
            u = subspace_iteration(view, m, previous[:, :r])
            u = u.to(view.dtype)
            self.set_factor(m, u)
            out[m] = u
        return out

    def decomposition_macs(self, view: Sequence[int]) -> int:
        """One subspace-iteration step (the cheaper of X (X^T U) and (X X^T) U) and its QR."""
        total, ranks, macs = math.prod(view), self.ranks(), 0
        for m in self.modes:
            n = view[m]
            rest = total // n
            r = ranks[m] or n
            macs += min(2 * n * rest * r, n * n * rest + n * n * r) + n * r * r
        return macs


@register_method
class HOSVD(Compressor):
    """HOSVD_eps (Nguyen et al. 2024): truncated HOSVD of every compressed mode at every step.

    Ranks follow the energy rule ``eps`` per mode and per batch. By default the batch mode is
    compressed too (the published method; each step's factors are computed on that step's batch).
    """

    name = "hosvd"
    bench_options = ("eps",)

    def __init__(self, layer_name: str, n_modes: int, eps: float = 0.7, compress_batch: bool = True,
                 **unused):
        super().__init__(layer_name, n_modes, compress_batch, **unused)
        self.eps = check_eps(eps)

    def step_factors(self, view: Tensor) -> list[Optional[Tensor]]:
        out: list[Optional[Tensor]] = [None] * self.n_modes
        for m in self.modes:
            out[m] = mode_basis(view, m, self.eps).to(view.dtype)
        self.last_ranks = tuple(None if u is None else int(u.shape[1]) for u in out)
        self.last_factor_shapes = [None if u is None else tuple(u.shape) for u in out]
        return out

    def decomposition_macs(self, view: Sequence[int]) -> int:
        """Gram of the smaller side of each unfolding (the dual one when n > rest), its eigh,
        and U = X V for the dual."""
        total, ranks, macs = math.prod(view), self.ranks(), 0
        for m in self.modes:
            n = view[m]
            rest = total // n
            small, large = min(n, rest), max(n, rest)
            macs += small * small * large + small ** 3 + (n * rest * ranks[m] if n > rest else 0)
        return macs


@register_method
class GradientFilter(Compressor):
    """Gradient filtering (Yang et al. 2023): R x R block means of input and grad_output.

    Conv2d only, tensor layout. grad_input stays exact here (our layer contract); grad_weight is
    approximate.
    """

    name = "gradient_filter"
    supported_layers = (nn.Conv2d,)
    uses_factors = False
    reads_activation = False
    bench_options = ("radius",)

    def __init__(self, layer_name: str, n_modes: int, radius: int = 2, **unused):
        super().__init__(layer_name, n_modes, **unused)
        if int(radius) < 1:
            raise ValueError(f"radius={radius!r} must be a positive integer (block side R)")
        self.radius = int(radius)

    def check_layer(self, layer: "CompressedLayer") -> None:
        super().check_layer(layer)
        if layer.layout != "tensor":
            raise ValueError(f"layer {self.layer_name!r}: gradient_filter works on the tensor layout; "
                             f"drop layout='patch'")

    def step_factors(self, view: Tensor) -> list[Optional[Tensor]]:
        return [None] * self.n_modes

    def layer_forward(self, layer: "CompressedLayer", x: Tensor) -> Tensor:
        self.bind(len(layer.view_shape(x.shape)))
        out, _ = GradientFilterConv2dFunction.apply(x, layer.weight, layer.bias, layer.conv_spec,
                                                    self.radius)
        return out

    def _blocks(self, layer: "CompressedLayer", shape: Sequence[int]) -> tuple[int, int]:
        return filter_blocks(layer.conv_spec.output_size(shape[2], shape[3], layer.kernel_size),
                             self.radius)

    def saved_bytes(self, layer: "CompressedLayer", shape: Sequence[int]) -> int:
        rows, cols = self._blocks(layer, shape)
        return shape[0] * shape[1] * rows * cols * layer.weight.element_size()

    def step_macs(self, layer: "CompressedLayer", shape: Sequence[int]) -> tuple[int, int]:
        b, c, h, w = shape
        ho, wo = layer.conv_spec.output_size(h, w, layer.kernel_size)
        rows, cols = self._blocks(layer, shape)
        c_out, c_group = layer.out_channels, c // layer.groups
        return b * rows * cols * c_out * c_group, b * c * h * w + b * c_out * ho * wo
