"""The compression methods, one interface, swappable per layer (SPEC 3.3).

A method object lives inside a compressed layer (``layer.compressor``) and answers one question per
training step: which factor (n_m, r_m), or None, to use for each mode of the layer's activation
view. All linear algebra comes from :mod:`lance_cl.core.linalg`.

=================  =================================================  ==================
method             subspace                                           per-step cost
=================  =================================================  ==================
vanilla            none: the layer saves x                            0
lance              Gram matrices over N calibration batches, one      projection only
                   eigendecomposition, factors fixed afterwards
hosvd              truncated HOSVD of every mode, every step (eps)    very high
asi                one warm-started subspace iteration per mode per    low
                   step, ranks fixed at calibration (eps or budget)
gradient_filter    R x R block means of x and grad_output (Conv2d)    low
=================  =================================================  ==================
"""
from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn

from .core.tucker import compact
from .core.linalg import (GramAccumulator, check_eps, energy_rank, mode_basis, mode_gram,
                          random_orthonormal,
                          sorted_eigh, subspace_iteration)

METHODS: dict[str, type["Compressor"]] = {}


class CalibrationError(RuntimeError):
    """A compressed layer was used in a way its calibration state does not allow."""


def register_method(cls: type["Compressor"]) -> type["Compressor"]:
    """Class decorator adding a method to :data:`METHODS` under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def build_compressor(method: str, layer_name: str, n_modes: Optional[int] = None,
                     **options) -> "Compressor":
    """Instantiate a registered method for one layer whose activation view has ``n_modes`` modes."""
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method](layer_name=layer_name, n_modes=n_modes, **options)


class Compressor(nn.Module):
    """Base class. Subclasses say which factors to use; layers do the autograd work.

    Factors are buffers named ``factor_<mode>``, so ``state_dict`` round-trips them even when
    their shapes were unknown when the module was built.
    """

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    uses_factors: ClassVar[bool] = True
    reads_activation: ClassVar[bool] = True   # False: step_factors needs only view.shape / dtype

    def __init__(self, layer_name: str, n_modes: Optional[int] = None, compress_batch: bool = False,
                 **unused):
        super().__init__()
        if unused:
            raise TypeError(f"method {self.name!r} got unexpected options {sorted(unused)} "
                            f"(layer {layer_name!r})")
        self.layer_name = layer_name
        self.compress_batch = bool(compress_batch)
        self.calibrating = False
        self.register_buffer("calibrated_shape", torch.zeros(0, dtype=torch.long))
        self.batch_fallbacks = 0     # steps where a fixed batch factor did not fit the batch size
        self.last_ranks: Optional[tuple[Optional[int], ...]] = None
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

    # -- protocol used by layers -----------------------------------------------------------------
    def step_factors(self, view: Tensor) -> list[Optional[Tensor]]:
        """Factors to compress this step's activation view (B, ...). Runs under no_grad.

        ``view`` may be a meta tensor (shape and dtype only) for methods with
        ``reads_activation = False``."""
        raise NotImplementedError

    def start_calibration(self) -> None:
        self.calibrating = True

    def observe(self, view: Tensor) -> None:
        """Calibration: look at one batch's activation view."""

    def finish_calibration(self) -> None:
        self.calibrating = False

    def factor_shapes(self) -> list[Optional[tuple[int, int]]]:
        """(n_m, r_m) of the factors the last step used (fixed or per-step), None if kept."""
        shapes = getattr(self, "last_factor_shapes", None)
        if shapes is not None:
            return list(shapes)
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

    def step_factors(self, view: Tensor) -> list[Optional[Tensor]]:
        return [None] * self.n_modes


class _EnergyOrBudget(Compressor):
    """Shared options of methods whose ranks come from an energy threshold or a byte budget."""

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

    def _rank_for(self, mode: int, eigenvalues: Tensor, eps: Optional[float] = None) -> int:
        if eps is None and self.fixed_rank is not None:
            r = self.fixed_rank if isinstance(self.fixed_rank, int) else self.fixed_rank[mode]
            return max(1, min(int(r), eigenvalues.numel()))
        return energy_rank(eigenvalues, self.eps if eps is None else eps)

    def eigen(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Per compressed mode: (eigenvalues descending, eigenvectors) from calibration."""
        if not hasattr(self, "_eigen"):
            grams = self._calibration_grams()
            if not grams:
                self._require_calibration()
                raise CalibrationError(f"layer {self.layer_name!r} saw no calibration batch")
            self._eigen = {m: sorted_eigh(g) for m, g in grams.items()}
        return self._eigen

    def _calibration_grams(self) -> dict[int, Tensor]:
        raise NotImplementedError

    def factors_for_eps(self, eps: Optional[float] = None) -> list[Optional[Tensor]]:
        """Factors that the energy rule ``eps`` (default: this layer's setting) would choose."""
        out: list[Optional[Tensor]] = [None] * self.n_modes
        for m, (lam, vec) in self.eigen().items():
            out[m] = compact(vec[:, : self._rank_for(m, lam, eps)])
        return out

    def finish_calibration(self, eps: Optional[float] = None) -> None:
        """Fix the factors. ``eps`` overrides the layer's threshold (used by budget selection)."""
        super().finish_calibration()
        if self.budget is not None and eps is None:
            return  # the budget solver picks eps and calls again
        factors = self.factors_for_eps(eps)
        if eps is not None:
            self.eps = eps
        self.fix_factors(factors)

    def calibration_grams(self) -> dict[int, Tensor]:
        """Gram matrix per compressed mode gathered by the calibration pass (before it is fixed)."""
        return dict(self._calibration_grams())

    def fix_factors(self, factors: Sequence[Optional[Tensor]]) -> None:
        """Use these factors (one (n_m, r_m) or None per mode) from now on and drop the
        calibration state. Callers that choose their own subspaces (LanceCLPlugin) use this."""
        self.calibrating = False
        for m, u in enumerate(factors):
            self.set_factor(m, u)
        self._factors_fixed(list(factors))
        for attr in ("_eigen",) + self._calibration_attrs:
            if hasattr(self, attr):
                delattr(self, attr)

    _calibration_attrs: ClassVar[tuple[str, ...]] = ()

    def _factors_fixed(self, factors: list[Optional[Tensor]]) -> None:
        """Hook run once the factors are fixed."""

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
    """

    name = "lance"
    needs_calibration = True
    reads_activation = False

    def start_calibration(self) -> None:
        super().start_calibration()
        self._grams: Optional[GramAccumulator] = None

    def observe(self, view: Tensor) -> None:
        if self._grams is None:  # modes are known once the layer has seen an input
            self._grams = GramAccumulator(self.modes)
        self._grams.update(view)
        if not self.is_calibrated or self._grams.num_batches == 1:
            self.calibrated_shape = torch.tensor(view.shape[1:], dtype=torch.long)
        else:
            self._check_shape(view)

    _calibration_attrs = ("_grams",)

    def _calibration_grams(self) -> dict[int, Tensor]:
        grams = getattr(self, "_grams", None)
        return {} if grams is None or grams.num_batches == 0 else grams.grams

    def step_factors(self, view: Tensor) -> list[Optional[Tensor]]:
        self._require_resolved()
        self._check_shape(view)
        factors = [None if u is None else u.to(view.dtype) for u in self.factors()]
        if factors[0] is not None and factors[0].shape[0] != view.shape[0]:
            factors[0] = None  # published fixed batch factor only fits the calibration batch size
            self.batch_fallbacks += 1
        return factors


@register_method
class HOSVD(Compressor):
    """HOSVD_eps (Nguyen et al. 2024): truncated HOSVD of every compressed mode at every step.

    Ranks follow the energy rule ``eps`` per mode and per batch. By default the batch mode is
    compressed too (the published method; each step's factors are computed on that step's batch).
    """

    name = "hosvd"

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
    needs_calibration = True

    def __init__(self, layer_name: str, n_modes: int, compress_batch: bool = True, **options):
        super().__init__(layer_name, n_modes, compress_batch=compress_batch, **options)
        self.register_buffer("rank_per_mode", torch.zeros(0, dtype=torch.long))

    def start_calibration(self) -> None:
        super().start_calibration()
        self._first_view: Optional[Tensor] = None

    def observe(self, view: Tensor) -> None:
        if self._first_view is None:
            self._first_view = view.detach().clone()
            self.calibrated_shape = torch.tensor(view.shape[1:], dtype=torch.long)

    _calibration_attrs = ("_first_view",)

    def _calibration_grams(self) -> dict[int, Tensor]:
        view = getattr(self, "_first_view", None)
        return {} if view is None else {m: mode_gram(view, m) for m in self.modes}

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


@register_method
class GradientFilter(Compressor):
    """Gradient filtering (Yang et al. 2023): R x R block means of input and grad_output.

    Conv2d only. grad_input stays exact here (our layer contract); grad_weight is approximate.
    """

    name = "gradient_filter"
    uses_factors = False
    reads_activation = False

    def __init__(self, layer_name: str, n_modes: int, radius: int = 2, **unused):
        super().__init__(layer_name, n_modes, **unused)
        if int(radius) < 1:
            raise ValueError(f"radius={radius!r} must be a positive integer (block side R)")
        self.radius = int(radius)

    def step_factors(self, view: Tensor) -> list[Optional[Tensor]]:
        return [None] * self.n_modes
