"""LanceCLPlugin: continual learning with compressed activations in task subspaces (docs/continual.md).

Every protected layer is a LANCE-compressed layer (Conv2d in the patch layout, so its fan-in mode
is exactly the fan-in axis of the weight). Before task t a calibration pass gathers the fan-in Gram
C_F; the task's training factor U_F is made of eigenvectors of (I - PP^T) C_F (I - PP^T), so it is
orthogonal to the protected basis P by construction. Its rank comes from GPM's total-energy rule
(``train_eps``, default eps_t) or from the residual rule (``train_energy``: a fraction of the
energy left outside span(P), optionally capped), which freezes a layer only when nothing is left. The layer then stores only the core
x x_F U_F^T (and, for convs, the output-position mode projected on its own energy subspace), and
its weight-gradient rows lie in span(U_F): inputs of earlier tasks inside span(P) see no change.
P is not needed while the task trains.

Where the core would be larger than the input itself (a conv whose patches outnumber its input
pixels and whose ranks stay high, common on tiny feature maps), the layer keeps its input instead
and its weight gradient is projected on span(U_F) after backward. Both forms give a gradient whose
rows lie in span(U_F) (with only the fan-in mode compressed they are the same gradient, docs/core.md
identity 3), so the guarantee is unchanged; the layer log records which form each layer used.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ... import wrap
from ...calibration import Calibration
from ...compact import recomputed_layer_names
from ...core.linalg import (check_column_ratio, check_eps, grow_basis, top_eigenvectors,
                            training_subspace)
from ...core.tucker import core_shape
from ...layers import CompressedConv2d, CompressedLayer, LayerMode
from .base import SubspacePlugin, forward_batch


class LanceCLPlugin(SubspacePlugin):
    """LANCE continual learning as an Avalanche plugin.

    Args:
        eps, eps_step: protected-energy schedule eps_t = eps + t * eps_step (GPM's thresholds).
        train_eps: total-energy rule of the training factor U_F: GPM's rule with threshold
            train_eps (default: eps_t, the protection threshold); a task whose energy P already covers beyond
            it gets rank 0 and its layer is frozen.
        train_energy: residual rule instead: U_F keeps this fraction of the task's energy left
            outside span(P), tr(C_res) (``lance_cl.core.linalg.training_subspace``), so a layer
            is frozen only when its inputs lie in span(P) to rounding.
        train_max_rank, train_max_rank_fraction: caps of the residual rule's rank, as a number
            of directions and as a fraction of the fan-in d (at least 1 direction); the
            smaller applies. A cap alone means train_energy=1. Exclusive with train_eps.
        position_eps: energy kept by the output-position mode of conv layers (None: that mode is
            not compressed). Layers recomputed in backward (a compacted stem,
            ``lance_cl.compact.recomputed_layer_names``) keep that mode whole: their core is
            never stored, so a smaller one would only cost time and gradient accuracy.
        first_task: "compressed" (default: the memory claim holds on every task) or "full"
            (published variant: task 1 trained with plain backprop).
        calibration_batches: batches of the task used to calibrate (None: all).
        calibration_column_ratio: each calibration batch adds at most ceil(ratio * n) sampled
            columns to a Gram of size n (``lance_cl.Calibration``; None: every column). A conv's
            patches give hundreds of columns per image; 4 keeps the calibration a small part
            of a task's time (docs/memory.md).
        small_layer_dim: layers with fan-in d <= this take the whole complement of P (80 in the
            reference code).
        basis_samples: samples of the finished task that grow P (GPM uses 125).
        layers / exclude: which Linear/Conv2d layers are shared and protected.
        heads: the output layers, never protected (default: detected, see
            ``lance_cl.cl.subspace.head_layer_names``; ``[]``: none).
        allow_unsafe_optimizer: skip the optimizer guard (weight decay, Adam-like optimizers).
    """

    name = "lance"

    def __init__(self, eps: float = 0.97, eps_step: float = 0.003, train_eps: Optional[float] = None,
                 position_eps: Optional[float] = 0.9, first_task: str = "compressed",
                 calibration_batches: Optional[int] = None, small_layer_dim: int = 80,
                 train_energy: Optional[float] = None, train_max_rank: Optional[int] = None,
                 train_max_rank_fraction: Optional[float] = None,
                 calibration_column_ratio: Optional[float] = 4.0, **options):
        super().__init__(eps=eps, eps_step=eps_step, small_layer_dim=small_layer_dim, **options)
        if first_task not in ("compressed", "full"):
            raise ValueError(f"first_task={first_task!r}: choose 'compressed' or 'full'")
        self.train_eps = None if train_eps is None else check_eps(train_eps, "train_eps")
        self._set_residual_rule(train_energy, train_max_rank, train_max_rank_fraction)
        self.position_eps = None if position_eps is None else check_eps(position_eps, "position_eps")
        self.first_task = first_task
        self.calibration_batches = calibration_batches
        self.calibration_column_ratio = check_column_ratio(calibration_column_ratio)
        self.frozen: list[str] = []
        self._grad_projectors: dict[str, torch.Tensor] = {}   # layers that store their input

    def _set_residual_rule(self, energy: Optional[float], max_rank: Optional[int],
                           max_rank_fraction: Optional[float]) -> None:
        residual = (energy, max_rank, max_rank_fraction) != (None, None, None)
        if residual and self.train_eps is not None:
            raise ValueError(
                f"LanceCLPlugin: train_eps={self.train_eps} (total-energy rule) cannot be combined "
                f"with train_energy / train_max_rank / train_max_rank_fraction (residual-energy "
                f"rule); pass the options of one rule only")
        if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int)
                                     or max_rank < 1):
            raise ValueError(f"train_max_rank={max_rank!r}: pass an int >= 1 or None")
        self.train_energy = (None if not residual else
                             1.0 if energy is None else check_eps(energy, "train_energy"))
        self.train_max_rank = max_rank
        self.train_max_rank_fraction = (None if max_rank_fraction is None else
                                        check_eps(max_rank_fraction, "train_max_rank_fraction"))

    def rank_cap(self, d: int) -> Optional[int]:
        """Largest rank the residual rule may give a layer of fan-in d (None: no cap)."""
        caps = [c for c in (self.train_max_rank, None if self.train_max_rank_fraction is None
                            else max(1, int(self.train_max_rank_fraction * d))) if c is not None]
        return min(caps) if caps else None

    def _compress(self, model: nn.Module) -> dict[str, CompressedLayer]:
        names = self.protected_names(model)
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise ValueError(f"LanceCLPlugin: layer {name!r} is a grouped conv "
                                 f"(groups={module.groups}); fan-in protection needs groups=1. "
                                 f"Exclude it with exclude=[...] or layers=[...].")
        if not all(isinstance(model.get_submodule(n), CompressedLayer) for n in names):
            wrap.compress(model, "lance", layers=names, layout="patch")
        return {n: model.get_submodule(n) for n in names}

    def prepare_task(self, strategy) -> None:
        model = strategy.model
        layers = self._compress(model)
        full_backprop = self.tasks_trained == 0 and self.first_task == "full"
        for layer in layers.values():
            layer.set_mode(LayerMode.FULL_BACKPROP if full_backprop else LayerMode.COMPRESSED)
        if full_backprop:
            return
        loader = self.task_loader(strategy, batch_size=strategy.train_mb_size)
        recomputed = recomputed_layer_names(model)
        # a conv without a position factor needs only its fan-in Gram (mode 1 of the patches)
        fan_in_only = {n: (1,) for n, layer in layers.items() if isinstance(layer, CompressedConv2d)
                       and not self._position_factor(n in recomputed)}
        calibration = Calibration(model, layers, forward=forward_batch,
                                  column_ratio=self.calibration_column_ratio, modes=fan_in_only)
        calibration.run(self._device_batches(loader, strategy.device),
                        num_batches=self.calibration_batches, progress=False)
        self.frozen = []
        self._grad_projectors = {}
        for name, layer in layers.items():
            self._set_training_factors(name, layer, calibration, recomputed=name in recomputed)

    def _training_factor(self, name: str, gram: torch.Tensor, rank_bound: Optional[int] = None
                         ) -> tuple[torch.Tensor, float, dict]:
        """U_F (d, r) orthogonal to P by the configured rule, the energy P covers, log entries;
        ``rank_bound``: the columns summed into the Gram (a bound on its rank)."""
        d = gram.shape[0]
        take_all = d <= self.small_layer_dim
        basis = self.bases.get(name)
        if self.train_energy is None:
            threshold = self.train_eps if self.train_eps is not None else self.threshold(self.tasks_trained)
            u, covered = grow_basis(gram, basis, threshold, take_all=take_all, rank_bound=rank_bound)
            info = {"train_rule": "total_energy", "train_threshold": threshold}
        else:
            cap = self.rank_cap(d)
            u, covered, kept = training_subspace(gram, basis, self.train_energy, cap, take_all,
                                                 rank_bound=rank_bound)
            info = {"train_rule": "residual_energy", "train_threshold": self.train_energy,
                    "train_rank_cap": cap, "train_residual_energy_kept": kept}
        if take_all:
            info["train_rule"] = "complement"       # small layer: the whole complement of P
        return u, covered, info

    def _position_factor(self, recomputed: bool) -> bool:
        """Whether a layer gets position factors: with a position_eps, unless it is recomputed in
        backward, where a smaller core saves nothing."""
        return self.position_eps is not None and not recomputed

    def _set_training_factors(self, name: str, layer: CompressedLayer, calibration: Calibration,
                              recomputed: bool = False) -> None:
        """U_F and (:meth:`_position_factor`) the position factors of one layer.

        A layer keeps its input and has its weight gradient projected, g <- g U_F U_F^T (the same
        gradient as from the core, the product being linear), when the core would be no smaller
        than the input, or when the layer is ``recomputed`` in backward: nothing of it is stored
        then, and the plain weight gradient is the cheaper product."""
        comp = layer.compressor
        grams = calibration.grams(name)
        fan_in_mode = 1 if isinstance(layer, CompressedConv2d) else comp.n_modes - 1
        u_fan_in, covered, rule = self._training_factor(
            name, grams[fan_in_mode], calibration.columns(name).get(fan_in_mode))
        dtype = layer.weight.dtype
        factors: list = [None] * comp.n_modes
        factors[fan_in_mode] = u_fan_in.to(dtype)
        position = self._position_factor(recomputed)
        for mode, gram in grams.items():
            if mode != fan_in_mode and position:
                factors[mode] = top_eigenvectors(gram, eps=self.position_eps)[0].to(dtype)
        log = self._task_log["layers"][name]
        log.update(rule, train_rank=u_fan_in.shape[1], train_energy_covered_by_P=covered,
                   ranks=[None if f is None else int(f.shape[1]) for f in factors])
        if u_fan_in.shape[1] == 0:
            # no direction left: the layer is frozen for this task rather than trained unprojected
            layer.set_mode(LayerMode.FROZEN)        # requires_grad off until finish_task
            self.frozen.append(name)
            factors[fan_in_mode] = None
        log["frozen"] = u_fan_in.shape[1] == 0
        calibration.fix_factors(name, factors)
        per_sample_core = math.prod(core_shape(comp.calibrated_shape.tolist(), factors[1:]))
        per_sample_input = math.prod(layer.last_input_shape[1:])
        store_input = u_fan_in.shape[1] > 0 and (recomputed or per_sample_core >= per_sample_input)
        log["storage"] = "input" if store_input else "core"
        if store_input:
            layer.set_mode(LayerMode.STORE_INPUT)
            self._grad_projectors[name] = u_fan_in.to(layer.weight.device, layer.weight.dtype)

    @torch.no_grad()
    def after_backward(self, strategy, *args, **kwargs):
        """Layers that keep their input: g <- g U_F U_F^T on the fan-in axis."""
        for name, u in self._grad_projectors.items():
            weight = strategy.model.get_submodule(name).weight
            if weight.grad is not None:
                g = weight.grad.view(weight.shape[0], -1)
                g.copy_((g @ u) @ u.t())

    def finish_task(self, strategy) -> None:
        for name in self.frozen:
            strategy.model.get_submodule(name).set_mode(LayerMode.COMPRESSED)
        self.frozen = []
        self._factor_bytes = self._current_factor_bytes(strategy.model)
        for name in self._grad_projectors:
            strategy.model.get_submodule(name).set_mode(LayerMode.COMPRESSED)
        self._grad_projectors = {}

    def _current_factor_bytes(self, model: nn.Module) -> int:
        total = 0
        for name in self.protected_names(model):
            layer = model.get_submodule(name)
            if isinstance(layer, CompressedLayer):
                total += sum(u.numel() * u.element_size()
                             for u in layer.compressor.factors() if u is not None)
        return total

    def training_extra_bytes(self) -> int:
        """The fixed factors U_F (and position factors) held while a task trains."""
        return getattr(self, "_factor_bytes", 0)

    def state_dict(self):
        state = super().state_dict()
        state.update(first_task=self.first_task, train_eps=self.train_eps,
                     train_energy=self.train_energy, train_max_rank=self.train_max_rank,
                     train_max_rank_fraction=self.train_max_rank_fraction,
                     position_eps=self.position_eps, factor_bytes=self.training_extra_bytes())
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.first_task = state["first_task"]
        self.train_eps, self.position_eps = state["train_eps"], state["position_eps"]
        self.train_energy = state.get("train_energy")        # absent in older checkpoints
        self.train_max_rank = state.get("train_max_rank")
        self.train_max_rank_fraction = state.get("train_max_rank_fraction")
        self._factor_bytes = state["factor_bytes"]
