"""CODE-CL (Apolinario, Choudhary & Roy, ICCV 2025): conceptor-based gradient projection.

Per protected layer, the fan-in correlation R = X X^T / n of a task's layer inputs (n columns:
samples x positions, from ``basis_samples`` = 125 samples) gives the conceptor
C = R (R + a^-2 I)^-1 (aperture a). The aperture is adapted (a <- 1.1 a, as often as needed)
until the conceptor reconstructs the inputs well enough: sum_j ||C x_j|| / sum_j ||x_j|| >=
``aperture_gain``. The conceptors of successive tasks are merged with the conceptor OR
C v B = not(not C and not B), eigenvalues below ``lower_bound`` (0.2) are set to zero, and from
the second task on every protected weight gradient is projected as g <- g - g C (fan-in view,
like GPM's g - g M M^T, docs/continual.md).

Forward transfer: before task t trains, the conceptor B of task t's inputs (same rule, under the
current weights) is intersected with the old conceptor, A = C and B. Where the capacity ratio
mean(eig A) / mean(eig C) exceeds 0.5 (and the fan-in exceeds ``num_free_dim`` for a conv,
``min_linear_fan_in`` = 50 for a Linear), the top ``num_free_dim`` (K) eigenvectors U of A are
kept and task t uses the weight W + W U M U^T - sg(W) U U^T (value W (I - UU^T) + W U M U^T;
sg = stop-gradient) with a fresh learned K x K matrix M, initialised like the official code's
``nn.Linear(K, K, bias=False)`` (uniform in +-1/sqrt(K)). U and the trained M are stored per
task and used again whenever that task is evaluated (selected by the task label the model
receives); the weight's own gradient is projected as above, M's is not.

Published hyperparameters (official code, github.com/mapolinario94/CODE-CL, ``script.sh`` and
``utils/args.py``; all with plain SGD, no momentum, no weight decay, batch 64, 125 samples per
conceptor, lower bound 0.2, K = 80; 5 % of each task's training set held out for validation on
Split CIFAR-100 and 5-Datasets; the lr is halved once more than ``patience`` epochs pass without
a better validation *accuracy* (``cl_method/strategy.py`` always halves; ``lr-decay`` only
divides the counter that stops training below ``lr-threshold``); the best-validation weights,
M included, are restored at the end of a task):

- Split CIFAR-100 (AlexNet, 10 tasks): aperture 6, aperture gain 0.95, lr 0.01, 200 epochs,
  patience 6, decay 2, lr threshold 1e-5;
- Split MiniImageNet (ResNet-18, 20 tasks, ``main.py``): aperture 8, gain 0.95, lr 0.1,
  100 epochs, patience 6, decay 2, lr threshold 1e-5;
- 5-Datasets (ResNet-18): aperture 4, gain 0.01, lr 0.1, 100 epochs, patience 5, decay 3,
  lr threshold 1e-3.

The scripts also pass ``--threshold-conv/--threshold-linear 0.95``; the official code stores
them but never reads them, so they have no counterpart here. Implementation notes: every
conceptor operation runs in float64 through symmetric eigendecompositions (the official code
uses SVDs and explicit inverses, same operators); results of AND and aperture adaptation are
clamped to eigenvalues in [1e-8, 1 - 1e-7] as in the official code; the merged conceptor is
stored factored (eigenvectors with nonzero eigenvalue and those eigenvalues, float32), which
is the same matrix in d x k instead of d x d numbers.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from avalanche.models import MultiTaskModule
from torch import Tensor, nn

from ...core.linalg import sorted_eigh
from ..subspace import collect_fan_in_grams, fan_in_dim, fan_in_view
from .base import SubspacePlugin, forward_batch

EIG_FLOOR, EIG_CEIL = 1e-8, 1.0 - 1e-7     # the official code's clamp of AND / adaptation results
RANK_TOL = 1e-6                            # eigenvalues at or below count as zero in AND

__all__ = ["CODEPlugin", "recipe_plugins", "conceptor", "conceptor_and", "conceptor_or",
           "conceptor_not", "adapt_aperture", "capacity", "truncate_spectrum", "project_gradient"]


# -- conceptor algebra (symmetric (d, d) matrices with eigenvalues in [0, 1], float64) -----------
def _symmetric(eigenvalues: Tensor, vectors: Tensor) -> Tensor:
    """V diag(lam) V^T."""
    return (vectors * eigenvalues) @ vectors.t()


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric matrix in float64, eigenvalues descending."""
    m = matrix.to(torch.float64)
    return sorted_eigh(0.5 * (m + m.t()))


def _clamped(matrix: Tensor) -> Tensor:
    """The matrix with its eigenvalues clamped to [EIG_FLOOR, EIG_CEIL]."""
    lam, vec = _eigh(matrix)
    return _symmetric(lam.clamp(EIG_FLOOR, EIG_CEIL), vec)


def conceptor_eigen(correlation: Tensor, aperture: float) -> tuple[Tensor, Tensor]:
    """Eigen-form of C = R (R + a^-2 I)^-1: (c (d,) descending, V (d, d)), c = r / (r + a^-2)."""
    if not aperture > 0:
        raise ValueError(f"aperture={aperture!r} must be positive (CODE-CL uses 4 to 8)")
    r, vec = _eigh(correlation)
    r = r.clamp_min(0)
    return r / (r + aperture ** -2), vec


def conceptor(correlation: Tensor, aperture: float) -> Tensor:
    """C = R (R + a^-2 I)^-1 of a correlation matrix R (d, d) (float64)."""
    return _symmetric(*conceptor_eigen(correlation, aperture))


def adapt_aperture(eigenvalues: Tensor, gamma: float) -> Tensor:
    """Eigenvalues of C (C + gamma^-2 (I - C))^-1, clamped as the official code does: the
    conceptor of the same R at aperture gamma * a."""
    c = eigenvalues.to(torch.float64)
    return (c / (c + gamma ** -2 * (1.0 - c))).clamp(EIG_FLOOR, EIG_CEIL)


def conceptor_not(c: Tensor) -> Tensor:
    """not C = I - C."""
    return torch.eye(c.shape[0], dtype=c.dtype, device=c.device) - c


def conceptor_and(c: Tensor, b: Tensor, tol: float = RANK_TOL) -> Tensor:
    """C and B = W (W^T (C^+ + B^+ - I) W)^-1 W^T, W an orthonormal basis of range(C) and
    range(B) intersected (Jaeger's formula for possibly singular conceptors; = (C^-1 + B^-1 -
    I)^-1 when both are invertible). Eigenvalues at or below ``tol`` count as zero; the result's
    are clamped to [1e-8, 1 - 1e-7]. c, b: (d, d)."""
    lam_c, vec_c = _eigh(c)
    lam_b, vec_b = _eigh(b)
    null_c, null_b = vec_c[:, lam_c <= tol], vec_b[:, lam_b <= tol]
    lam_s, vec_s = _eigh(null_c @ null_c.t() + null_b @ null_b.t())
    w = vec_s[:, lam_s <= tol]                  # directions in neither null space
    d = c.shape[0]
    if w.shape[1] == 0:
        return torch.full((d,), EIG_FLOOR, dtype=torch.float64, device=c.device).diag()

    def pinv(lam: Tensor, vec: Tensor) -> Tensor:
        keep = lam > tol
        return _symmetric(1.0 / lam[keep], vec[:, keep])
    inner = w.t() @ (pinv(lam_c, vec_c) + pinv(lam_b, vec_b)) @ w - torch.eye(
        w.shape[1], dtype=torch.float64, device=c.device)
    lam_i, vec_i = _eigh(inner)                  # >= I on range(W): positive definite
    return _clamped(_symmetric(1.0 / lam_i, w @ vec_i))


def conceptor_or(c: Tensor, b: Tensor, tol: float = RANK_TOL) -> Tensor:
    """C or B = not(not C and not B) (De Morgan, as the official code computes it)."""
    return conceptor_not(conceptor_and(conceptor_not(c), conceptor_not(b), tol))


def capacity(c: Tensor) -> float:
    """Mean eigenvalue of a conceptor (the official code's ``measure_conceptor_capacity``)."""
    return float(torch.linalg.eigvalsh(c.to(torch.float64)).mean())


def truncate_spectrum(c: Tensor, lower_bound: float) -> tuple[Tensor, Tensor]:
    """Eigenvalues below ``lower_bound`` set to zero. Returns the factored conceptor
    (V (d, k), c (k,)): its eigenvectors with eigenvalue >= lower_bound and those eigenvalues."""
    lam, vec = _eigh(c)
    keep = lam >= lower_bound
    return vec[:, keep], lam[keep]


def project_gradient(grad: Tensor, vectors: Tensor, values: Tensor) -> Tensor:
    """g - g C with C = V diag(c) V^T: grad (C_out, d) (the fan-in view), vectors (d, k),
    values (k,). Returns a new tensor of grad's shape."""
    v = vectors.to(grad.dtype)
    return grad - ((grad @ v) * values.to(grad.dtype)) @ v.t()


# -- the plugin ---------------------------------------------------------------------------------
class CODEPlugin(SubspacePlugin):
    """Conceptor-based gradient projection with forward transfer on the conceptors'
    intersection (module doc for the algorithm, its sources and the published values).

    Protected state (grown in ``after_training``, after every plugin's ``after_training_exp``,
    so restored best weights are what the conceptor describes): ``conceptors[layer]`` =
    {"vectors": V (d, k), "values": c (k,)}, the merged conceptor V diag(c) V^T; and
    ``transfer[task][layer]`` = {"basis": U (d, K), "scale": M (K, K)} for the layers where
    that task learned its intersection matrix. While a task trains, its M matrices are in an
    extra SGD param group (weight decay 0, the lr of the protected weights) and in the
    model's ``state_dict`` (keys ``codecl.scale.<layer>``), so a plugin that saves and
    restores the model's best weights restores them too; afterwards the model's state_dict is
    a plain one again. The task a forward pass serves is the task label the model receives
    (``model(x, task_labels)``, as ``avalanche_forward`` calls multi-task models); outside a
    strategy use :meth:`task_context`.
    """

    name = "codecl"

    def __init__(self, aperture: Union[float, Sequence[float]] = 6.0, aperture_gain: float = 0.95,
                 aperture_step: float = 1.1, lower_bound: float = 0.2, num_free_dim: int = 80,
                 min_linear_fan_in: int = 50, transfer_ratio: float = 0.5,
                 scale_init: str = "uniform", max_aperture_steps: int = 256, **options: Any):
        options.setdefault("basis_samples", 125)
        super().__init__(eps=1.0, eps_step=0.0, **options)
        apertures = [aperture] if isinstance(aperture, (int, float)) else list(aperture)
        if not apertures or any(not (isinstance(a, (int, float)) and a > 0) for a in apertures):
            raise ValueError(f"aperture={aperture!r}: give one positive number or one per "
                             f"protected layer (the published values are 4, 6 and 8)")
        if not 0.0 < aperture_gain < 1.0:
            raise ValueError(f"aperture_gain={aperture_gain!r} must lie in (0, 1): it is the "
                             f"fraction of input norm the conceptor must reconstruct (0.95)")
        if not aperture_step > 1.0:
            raise ValueError(f"aperture_step={aperture_step!r} must exceed 1 (official: 1.1)")
        if not 0.0 <= lower_bound < 1.0:
            raise ValueError(f"lower_bound={lower_bound!r} must lie in [0, 1) (official: 0.2)")
        if scale_init not in ("uniform", "identity"):
            raise ValueError(f"scale_init={scale_init!r}: choose 'uniform' (official nn.Linear "
                             f"initialisation) or 'identity'")
        if num_free_dim < 0 or max_aperture_steps < 0:
            raise ValueError("num_free_dim and max_aperture_steps must be >= 0")
        self.apertures = [float(a) for a in apertures]
        self.aperture_gain = float(aperture_gain)
        self.aperture_step = float(aperture_step)
        self.lower_bound = float(lower_bound)
        self.num_free_dim = int(num_free_dim)
        self.min_linear_fan_in = int(min_linear_fan_in)
        self.transfer_ratio = float(transfer_ratio)
        self.scale_init = scale_init
        self.max_aperture_steps = int(max_aperture_steps)
        self.conceptors: dict[str, dict[str, Tensor]] = {}
        self.transfer: dict[int, dict[str, dict[str, Tensor]]] = {}
        self.peak_training_extra_bytes = 0              # over the tasks trained so far
        # training-time and model-side state (never checkpointed)
        self._model: Optional[nn.Module] = None
        self._hooks: list[Any] = []
        self._training_hooks: list[Any] = []
        self._labels: Optional[Union[int, Tensor]] = None   # task labels of the running forward
        self._context: Optional[Union[int, Tensor]] = None  # set by task_context
        self._task: Optional[int] = None                 # the task being trained
        self._task_basis: dict[str, Tensor] = {}         # its U on the device
        self._scales: dict[str, nn.Parameter] = {}       # its trainable M
        self._param_group: Optional[dict] = None
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._projections: dict[str, tuple[Tensor, Tensor]] = {}
        self._device_transfer: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    # -- configuration ----------------------------------------------------------------------
    def aperture_of(self, model: nn.Module, name: str) -> float:
        """Initial aperture of a protected layer (one value for all, or one per layer)."""
        names = self.protected_names(model)
        if len(self.apertures) == 1:
            return self.apertures[0]
        if len(self.apertures) != len(names):
            raise ValueError(f"{len(self.apertures)} apertures for {len(names)} protected layers "
                             f"({', '.join(names)}): give one value or one per layer")
        return self.apertures[names.index(name)]

    def transfer_dim(self, module: nn.Module) -> int:
        """K for a layer, 0 where the official code learns no intersection matrix (conv: fan-in
        <= K; Linear: fan-in <= ``min_linear_fan_in``)."""
        d = fan_in_dim(module)
        if self.num_free_dim == 0:
            return 0
        if isinstance(module, nn.Conv2d):
            return self.num_free_dim if d > self.num_free_dim else 0
        return min(self.num_free_dim, d) if d > self.min_linear_fan_in else 0

    def conceptor_matrix(self, name: str) -> Tensor:
        """The merged conceptor of a layer as a (d, d) float64 matrix."""
        entry = self.conceptors[name]
        return _symmetric(entry["values"].double(), entry["vectors"].double())

    # -- conceptors of a task's inputs -------------------------------------------------------
    def task_conceptors(self, model: nn.Module, dataset: Any, device: Any) -> dict[str, dict[str, Any]]:
        """Conceptor of each protected layer's inputs over ``basis_samples`` samples of
        ``dataset`` under the current weights, aperture adapted by the reconstruction rule:
        the first n with sum_j ||C_n x_j|| / sum_j ||x_j|| >= ``aperture_gain``, where C_0 =
        R (R + a^-2 I)^-1 and C_{n+1} = C_n adapted by ``aperture_step`` (the official loop).
        Returns per layer {"matrix": C (d, d) float64, "aperture": final aperture, "steps": n,
        "ratio": reconstruction ratio reached}.
        """
        names = self.protected_names(model)
        correlations = self._input_correlations(model, names, dataset, device)
        candidates = {}
        for name in names:
            c, vec = conceptor_eigen(correlations[name], self.aperture_of(model, name))
            steps = [c]
            for _ in range(self.max_aperture_steps):
                steps.append(adapt_aperture(steps[-1], self.aperture_step))
            candidates[name] = (vec, torch.stack(steps, 1))               # (d, d), (d, steps + 1)
        ratios = self._reconstruction_ratios(model, candidates, dataset, device)
        out = {}
        for name in names:
            vec, eigenvalues = candidates[name]
            reached = (ratios[name] >= self.aperture_gain).nonzero()
            if len(reached) == 0:
                warnings.warn(f"CODEPlugin: layer {name!r} did not reach the reconstruction ratio "
                              f"{self.aperture_gain} in {self.max_aperture_steps} aperture steps "
                              f"(best {float(ratios[name].max()):.4f}); using the last conceptor")
            n = int(reached[0]) if len(reached) else self.max_aperture_steps
            out[name] = {"matrix": _symmetric(eigenvalues[:, n], vec),
                         "aperture": self.aperture_of(model, name) * self.aperture_step ** n,
                         "steps": n, "ratio": float(ratios[name][n])}
        return out

    def _input_correlations(self, model: nn.Module, names: Sequence[str], dataset: Any,
                            device: Any) -> dict[str, Tensor]:
        """R = X X^T / n per layer, (d, d) float64: the fan-in Gram over n columns (samples x
        output positions)."""
        columns = {n: 0 for n in names}

        def count(name):
            def hook(mod, inputs, output):
                channel = 1 if isinstance(mod, nn.Conv2d) else -1
                columns[name] += output.numel() // output.shape[channel]
            return hook
        handles = [model.get_submodule(n).register_forward_hook(count(n)) for n in names]
        try:
            grams = collect_fan_in_grams(model, names, self._batches(dataset, device),
                                         forward_batch, max_samples=self.basis_samples)
        finally:
            for h in handles:
                h.remove()
        return {n: grams[n] / max(columns[n], 1) for n in names}

    def _reconstruction_ratios(self, model: nn.Module, candidates: dict[str, tuple[Tensor, Tensor]],
                               dataset: Any, device: Any) -> dict[str, Tensor]:
        """sum_j ||C_n x_j|| / sum_j ||x_j|| for every candidate C_n = V diag(c_n) V^T of a
        layer (candidates: name -> (V (d, d), c (d, steps))), over the same samples as the
        correlations, accumulated batch by batch (no layer input is kept). name -> (steps,)."""
        reconstructed = {n: 0.0 for n in candidates}
        norms = {n: 0.0 for n in candidates}

        def accumulate(name):
            vec, squares = candidates[name][0], candidates[name][1].pow(2)

            def hook(mod, inputs, output):
                x = fan_in_view(mod, inputs[0].detach()).to(torch.float64)    # (N, d, L)
                v, c2 = vec.to(x.device), squares.to(x.device)
                for chunk in x.transpose(1, 2).reshape(-1, x.shape[1]).split(4096):
                    z2 = (chunk @ v).pow(2)                # squared eigen-coordinates (n, d)
                    reconstructed[name] = reconstructed[name] + (z2 @ c2).sqrt().sum(0).cpu()
                    norms[name] += float(z2.sum(1).sqrt().sum())
            return hook
        handles = [model.get_submodule(n).register_forward_hook(accumulate(n)) for n in candidates]
        try:     # no Gram here: collect_fan_in_grams only runs the forward passes
            collect_fan_in_grams(model, [], self._batches(dataset, device), forward_batch,
                                 max_samples=self.basis_samples)
        finally:
            for h in handles:
                h.remove()
        steps = self.max_aperture_steps + 1
        return {n: (reconstructed[n] / norms[n]) if norms[n] > 0
                else torch.ones(steps, dtype=torch.float64) for n in candidates}

    def _batches(self, dataset: Any, device: Any) -> Iterator[list[Tensor]]:
        return self._device_batches(self.task_loader(None, dataset=dataset), device)

    # -- model-side routing of the per-task transfer matrices --------------------------------
    def attach(self, model: nn.Module) -> None:
        """Install the forward hooks that apply each task's U, M (idempotent per model)."""
        if self._model is model and self._hooks:
            return
        self.detach()
        self._model = model
        self._hooks.append(model.register_forward_pre_hook(self._read_labels, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._clear_labels))
        for name in self.protected_names(model):
            module = model.get_submodule(name)
            self._hooks.append(module.register_forward_hook(self._transfer_hook(name)))

    def detach(self) -> None:
        """Remove the forward hooks (the model computes with its plain weights again)."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._model, self._labels = [], None, None

    @contextmanager
    def task_context(self, task_labels: Union[int, Tensor, None]):
        """Serve forward passes that do not pass task labels to the model (e.g. a single-head
        model called directly) as task ``task_labels``."""
        previous, self._context = self._context, task_labels
        self._labels = task_labels
        try:
            yield
        finally:
            self._context = self._labels = previous

    def _read_labels(self, module, args, kwargs):
        """Root pre-hook: the task labels of this call, ``model(x, task_labels)``."""
        labels = args[1] if len(args) > 1 else kwargs.get("task_labels", kwargs.get("task_label"))
        self._labels = self._context if labels is None else labels

    def _clear_labels(self, module, args, output):
        self._labels = self._context

    def _tasks_in(self, labels: Union[int, Tensor]) -> list[int]:
        if isinstance(labels, Tensor):
            return [int(t) for t in labels.unique().tolist()] if labels.numel() > 1 else [int(labels)]
        return [int(labels)]

    def _pair(self, task: int, name: str, device: Any) -> Optional[tuple[Tensor, Tensor]]:
        """(U, M) of ``task`` at layer ``name`` on ``device`` (M trainable for the current task)."""
        if task == self._task and name in self._scales:
            return self._task_basis[name], self._scales[name]
        entry = self.transfer.get(task, {}).get(name)
        if entry is None:
            return None
        key = (task, name)
        cached = self._device_transfer.get(key)
        if cached is None or cached[0].device != torch.device(device):
            cached = (entry["basis"].to(device), entry["scale"].to(device))
            self._device_transfer[key] = cached
        return cached

    def _transfer_hook(self, name: str):
        def hook(module, inputs, output):
            labels = self._labels
            if labels is None or (not self.transfer and not self._scales):
                return None
            x = inputs[0]
            tasks = self._tasks_in(labels)
            for task in tasks:
                pair = self._pair(task, name, output.device)
                if pair is None:
                    continue
                w = module.weight.view(module.weight.shape[0], -1)          # (C_out, d)
                u, m = (t.to(w.dtype) for t in pair)
                wu = w @ u
                # W U M U^T - sg(W) U U^T: the value W U (M - I) U^T, the official gradients
                delta = (wu @ (m @ u.t()) - wu.detach() @ u.t()).view_as(module.weight)
                if len(tasks) == 1:
                    return output + _layer_apply(module, x, delta)
                rows = torch.as_tensor(labels, device=x.device).reshape(-1) == task
                if rows.numel() != x.shape[0]:
                    raise ValueError(f"CODEPlugin: a mini-batch mixes tasks {tasks} but layer "
                                     f"{name!r} sees {x.shape[0]} rows for {rows.numel()} labels; "
                                     f"evaluate one task per batch")
                output = output.index_add(0, rows.nonzero().squeeze(1),
                                          _layer_apply(module, x[rows], delta))
            return output
        return hook

    def _scale_state(self, module, state, prefix, local_metadata):
        """state_dict post-hook while a task trains: its M matrices join the model's state."""
        for name, m in self._scales.items():
            state[f"{prefix}codecl.scale.{name}"] = m.detach().clone()

    def _load_scale_state(self, module, state, prefix, local_metadata, strict, missing, unexpected,
                          errors):
        """load_state_dict pre-hook: take the M entries out (into the live M), if present."""
        for name, m in self._scales.items():
            value = state.pop(f"{prefix}codecl.scale.{name}", None)
            if value is not None:
                with torch.no_grad():
                    m.copy_(value)

    # -- subclass hooks -------------------------------------------------------------------------
    def prepare_task(self, strategy) -> None:
        model = strategy.model
        names = self.protected_names(model)
        grouped = [n for n in names if getattr(model.get_submodule(n), "groups", 1) != 1]
        if grouped:
            raise ValueError(f"CODEPlugin: grouped convs {grouped} cannot be protected (a conceptor "
                             f"acts on the whole fan-in); leave them out with exclude=[...] or "
                             f"layers=[...].")
        self.aperture_of(model, names[0])       # one aperture, or one per layer
        self.attach(model)
        device = strategy.device
        self._task = int(strategy.experience.task_label)
        self._projections = {n: (e["vectors"].to(device), e["values"].to(device))
                             for n, e in self.conceptors.items()}
        if not self.conceptors or self.num_free_dim == 0:
            return
        if not isinstance(model, MultiTaskModule):
            raise ValueError("CODEPlugin: the forward-transfer matrices are chosen by the task "
                             "label the model receives, and this model is not an Avalanche "
                             "MultiTaskModule (it gets no task labels). Use a multi-head model, "
                             "or num_free_dim=0 for the conceptor projection alone.")
        eligible = [n for n in names if self.transfer_dim(model.get_submodule(n)) > 0]
        if not eligible:
            return
        new = self.task_conceptors(model, strategy.experience.dataset, device)
        for name in eligible:
            old = self.conceptor_matrix(name).to(new[name]["matrix"].device)
            vectors, values = truncate_spectrum(new[name]["matrix"], self.lower_bound)
            both = conceptor_and(old, _symmetric(values, vectors))
            old_capacity = capacity(old)
            ratio = capacity(both) / old_capacity if old_capacity > 0 else 0.0
            log = self._task_log["layers"][name]
            log.update(transfer_ratio=ratio, transfer_dim=0)
            if not ratio > self.transfer_ratio:
                continue
            k = self.transfer_dim(model.get_submodule(name))
            u = _eigh(both)[1][:, :k]
            self._task_basis[name] = u.to(device=device, dtype=torch.float32).contiguous()
            self._scales[name] = nn.Parameter(self._initial_scale(k).to(device))
            log["transfer_dim"] = k
        if self._scales:
            self.peak_training_extra_bytes = max(self.peak_training_extra_bytes,
                                                 self.training_extra_bytes())
            self._add_param_group(strategy)
            # torch marks state_dict hooks with an attribute, which bound methods cannot take
            self._training_hooks = [
                model.register_state_dict_post_hook(lambda *a: self._scale_state(*a)),
                model.register_load_state_dict_pre_hook(lambda *a: self._load_scale_state(*a))]

    def _initial_scale(self, k: int) -> Tensor:
        if self.scale_init == "identity":
            return torch.eye(k)
        bound = 1.0 / math.sqrt(k)          # nn.Linear(k, k)'s default (Kaiming uniform, a=sqrt 5)
        return torch.empty(k, k).uniform_(-bound, bound)

    def _add_param_group(self, strategy) -> None:
        optimizer = strategy.optimizer
        protected = {id(p) for p in self.protected_weights(strategy.model)}
        group = next((g for g in optimizer.param_groups if any(id(p) in protected for p in g["params"])),
                     optimizer.param_groups[0])
        optimizer.add_param_group({"params": list(self._scales.values()), "lr": group["lr"],
                                   "weight_decay": 0.0})
        self._param_group, self._optimizer = optimizer.param_groups[-1], optimizer

    def _end_training(self) -> None:
        """Store the finished task's U, M; drop its param group and state_dict entries."""
        if self._scales:
            self.transfer[self._task] = {
                n: {"basis": self._task_basis[n].detach().float().cpu().clone(),
                    "scale": self._scales[n].detach().float().cpu().clone()} for n in self._scales}
        if self._optimizer is not None:
            self._optimizer.param_groups = [g for g in self._optimizer.param_groups
                                            if g is not self._param_group]
            for p in self._scales.values():
                self._optimizer.state.pop(p, None)
        for h in self._training_hooks:
            h.remove()
        self._training_hooks, self._scales, self._task_basis, self._task = [], {}, {}, None
        self._param_group, self._optimizer, self._projections = None, None, {}
        self._device_transfer = {}

    @torch.no_grad()
    def after_backward(self, strategy, *args, **kwargs):
        model = strategy.model
        for name, (vectors, values) in self._projections.items():
            weight = model.get_submodule(name).weight
            if weight.grad is None:
                continue
            g = weight.grad.view(weight.shape[0], -1)
            g.copy_(project_gradient(g, vectors, values))

    def _finish_pending(self, strategy) -> None:
        """Merge the finished task's conceptors into the protected ones (weights as they are
        now: best weights restored by other plugins included)."""
        if self._pending is None:
            return
        dataset, self._pending = self._pending, None
        model = strategy.model
        self._end_training()
        self.attach(model)
        new = self.task_conceptors(model, dataset, strategy.device)
        for name, entry in new.items():
            old = self.conceptors.get(name)
            merged = entry["matrix"] if old is None else conceptor_or(
                self.conceptor_matrix(name).to(entry["matrix"].device), entry["matrix"])
            vectors, values = truncate_spectrum(merged, self.lower_bound)
            self.conceptors[name] = {"vectors": vectors.float().cpu().contiguous(),
                                     "values": values.float().cpu()}
            self._task_log["layers"][name].update(
                dim=fan_in_dim(model.get_submodule(name)), aperture=entry["aperture"],
                aperture_steps=entry["steps"], reconstruction=entry["ratio"],
                conceptor_rank=int(values.numel()),
                capacity=float(values.sum()) / max(fan_in_dim(model.get_submodule(name)), 1))
        self.finish_task(strategy)
        self.layer_log.append(self._task_log)
        self.tasks_trained += 1

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Conceptors, per-task transfer matrices, task count, logs, hyperparameters."""
        state = super().state_dict()
        if self._scales:
            raise RuntimeError("CODEPlugin.state_dict(): a task is training; checkpoint after "
                               "strategy.train() returns")
        state.update(
            conceptors={n: {k: v.clone() for k, v in e.items()} for n, e in self.conceptors.items()},
            transfer={t: {n: {k: v.clone() for k, v in e.items()} for n, e in layers.items()}
                      for t, layers in self.transfer.items()},
            hyperparameters=self._hyperparameters(),
            peak_training_extra_bytes=self.peak_training_extra_bytes)
        return state

    def _hyperparameters(self) -> dict[str, Any]:
        return {"apertures": list(self.apertures), "aperture_gain": self.aperture_gain,
                "aperture_step": self.aperture_step, "lower_bound": self.lower_bound,
                "num_free_dim": self.num_free_dim, "min_linear_fan_in": self.min_linear_fan_in,
                "transfer_ratio": self.transfer_ratio, "scale_init": self.scale_init,
                "max_aperture_steps": self.max_aperture_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.conceptors = {n: {k: v.detach().float().cpu().clone() for k, v in e.items()}
                           for n, e in state["conceptors"].items()}
        self.transfer = {int(t): {n: {k: v.detach().float().cpu().clone() for k, v in e.items()}
                                  for n, e in layers.items()} for t, layers in state["transfer"].items()}
        self.peak_training_extra_bytes = int(state["peak_training_extra_bytes"])
        for key, value in state["hyperparameters"].items():
            setattr(self, key, list(value) if key == "apertures" else value)
        self._device_transfer, self._projections = {}, {}

    def restore_model_state(self, model: nn.Module) -> None:
        """Re-freeze first-task-only parameters and install the transfer hooks on ``model``."""
        super().restore_model_state(model)
        self.attach(model)

    # -- memory ---------------------------------------------------------------------------------
    def persistent_bytes(self) -> int:
        """Factored conceptors plus every task's stored U and M."""
        return sum(t.numel() * t.element_size() for store in (self.conceptors, *self.transfer.values())
                   for entry in store.values() for t in entry.values())

    def training_extra_bytes(self) -> int:
        """Gradients of the training task's M matrices (the projection reads the persistent
        factored conceptors; the new task's U and M become persistent)."""
        return sum(m.numel() * m.element_size() for m in self._scales.values())

    def memory_stats(self, model: Optional[nn.Module] = None) -> dict[str, int]:
        """Persistent bytes; training extra: the current task's, else the largest over the
        tasks trained (the runner reads it between tasks); and the persistent split."""
        stats = super().memory_stats(model)
        stats["training_extra_bytes"] = max(stats["training_extra_bytes"],
                                            self.peak_training_extra_bytes)
        stats["conceptor_bytes"] = sum(t.numel() * t.element_size() for e in self.conceptors.values()
                                       for t in e.values())
        stats["transfer_bytes"] = stats["persistent_bytes"] - stats["conceptor_bytes"]
        return stats


def _layer_apply(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The layer's linear map with another weight and no bias: x -> x W^T or conv(x, W)."""
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight, None)
    return F.linear(x, weight)


def recipe_plugins(defaults: dict) -> list:
    """The plugins of recipe ``codecl`` from a benchmark's defaults (``codecl_aperture``,
    ``codecl_aperture_gain``, ``codecl_num_free_dim``, ``codecl_lower_bound``; published
    Split CIFAR-100 values 6, 0.95, 80, 0.2 when absent) and ``gpm_samples`` (125)."""
    return [CODEPlugin(aperture=defaults.get("codecl_aperture", 6.0),
                       aperture_gain=defaults.get("codecl_aperture_gain", 0.95),
                       num_free_dim=defaults.get("codecl_num_free_dim", 80),
                       lower_bound=defaults.get("codecl_lower_bound", 0.2),
                       basis_samples=defaults.get("gpm_samples", 125))]
