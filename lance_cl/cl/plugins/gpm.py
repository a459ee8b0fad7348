"""Gradient-projection baselines: GPM (Saha et al., ICLR 2021) and SGP (Saha & Roy, AAAI 2023).

Both keep vanilla activations and project every protected weight gradient on its fan-in axis
after backward: g <- g - g M M^T (GPM) or g <- g - g M diag(lambda) M^T (SGP). Like the official
code they hold the dense d x d projection matrix of every protected layer while a task trains.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import SubspacePlugin


class GPMPlugin(SubspacePlugin):
    """Gradient Projection Memory.

    After each task, the representation (fan-in Gram over ``basis_samples`` samples of the task)
    grows the basis M by the energy rule with eps_t = eps + t * eps_step (published thresholds:
    Split CIFAR-100 0.97 + 0.003 t, 5-Datasets 0.965, MiniImageNet 0.985). From the second task
    on, gradients of protected weights are projected off span(M); BatchNorm affine parameters and
    biases are trained on the first task only; heads are free. Plain SGD is required.
    """

    name = "gpm"

    def __init__(self, eps: float = 0.97, eps_step: float = 0.003, **options):
        super().__init__(eps=eps, eps_step=eps_step, **options)
        self._projections: dict[str, Tensor] = {}

    def projection_matrix(self, name: str) -> Tensor:
        """(d, d) matrix whose right-multiplication removes the protected component."""
        m = self.bases[name]
        return m @ m.t()

    def prepare_task(self, strategy) -> None:
        model = strategy.model
        for name in self.protected_names(model):
            module = model.get_submodule(name)
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise ValueError(f"{type(self).__name__}: layer {name!r} is a grouped conv "
                                 f"(groups={module.groups}); fan-in protection needs groups=1. "
                                 f"Exclude it with exclude=[...] or layers=[...].")
        device = strategy.device
        self._projections = {n: self.projection_matrix(n).to(device)
                             for n in self.protected_names(model) if n in self.bases}

    @torch.no_grad()
    def after_backward(self, strategy, *args, **kwargs):
        if not self._projections:
            return
        model = strategy.model
        for name, proj in self._projections.items():
            weight = model.get_submodule(name).weight
            if weight.grad is None:
                continue
            g = weight.grad.view(weight.shape[0], -1)
            g.sub_(g @ proj.to(g.dtype))

    def finish_task(self, strategy) -> None:
        self._projections = {}

    def training_extra_bytes(self) -> int:
        return sum(b.shape[0] ** 2 * b.element_size() for b in self.bases.values())


class SGPPlugin(GPMPlugin):
    """Scaled Gradient Projection: GPM's bases with importances in [0, 1].

    lambda_i = (alpha + 1) s_i / (alpha s_i + max_j s_j), with s_i the singular value of the task's
    representation along basis vector i (s_i^2 = u_i^T C u_i); importances of existing vectors
    accumulate over tasks and are clipped to [0, 1]; projection g <- g - g M diag(lambda) M^T.
    """

    name = "sgp"

    def __init__(self, eps: float = 0.97, eps_step: float = 0.003, alpha: float = 10.0, **options):
        super().__init__(eps=eps, eps_step=eps_step, **options)
        self.alpha = float(alpha)
        self.importances: dict[str, Tensor] = {}

    def update_basis(self, name: str, old: Optional[Tensor], new: Tensor, gram: Tensor) -> None:
        super().update_basis(name, old, new, gram)
        basis = self.bases[name].to(torch.float64)
        s = torch.einsum("dk,de,ek->k", basis, gram.to(basis), basis).clamp_min(0).sqrt()
        fresh = (self.alpha + 1) * s / (self.alpha * s + s.max().clamp_min(1e-30))
        k_old = 0 if old is None else old.shape[1]
        previous = self.importances.get(name, torch.zeros(0, dtype=torch.float64)).to(torch.float64)
        merged = torch.cat([(previous[:k_old] + fresh[:k_old]).clamp(0, 1), fresh[k_old:]])
        self.importances[name] = merged[: basis.shape[1]].float()

    def projection_matrix(self, name: str) -> Tensor:
        m = self.bases[name]
        return (m * self.importances[name]) @ m.t()

    def state_dict(self):
        state = super().state_dict()
        state["importances"] = {k: v.clone() for k, v in self.importances.items()}
        state["alpha"] = self.alpha
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.importances = {k: v.detach().float().cpu().clone() for k, v in state["importances"].items()}
        self.alpha = state["alpha"]

    def persistent_bytes(self) -> int:
        return super().persistent_bytes() + sum(v.numel() * v.element_size()
                                                for v in self.importances.values())
