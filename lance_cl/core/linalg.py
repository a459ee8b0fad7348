"""Gram accumulation, energy-rule truncation, subspace iteration and orthogonalisation.

Every decomposition runs in float32 or better and is cast back to the caller's dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .tucker import compact, mode_contract, mode_product


def decomposition_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is decomposed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_eps(eps: float, what: str = "eps") -> float:
    """Validate an energy threshold: it must lie in (0, 1]."""
    if not isinstance(eps, (int, float)) or not (0.0 < float(eps) <= 1.0):
        raise ValueError(
            f"{what}={eps!r} is outside (0, 1]: it is the fraction of activation energy to keep "
            f"(e.g. 0.7 keeps 70%); pass a number in (0, 1]."
        )
    return float(eps)


def mode_gram(x: Tensor, mode: int) -> Tensor:
    """Gram matrix of the mode-``mode`` unfolding, X_(m) X_(m)^T: (n_m, n_m), in float32 or better."""
    x = x.to(decomposition_dtype(x.dtype))
    return mode_contract(x, x, mode)


def energy_rank(eigenvalues: Tensor, eps: float, total: Optional[float] = None) -> int:
    """Smallest r with sum_{i<=r} lambda_i >= eps * total (eigenvalues sorted descending; total:
    sum_i lambda_i, or the energy of a whole spectrum of which ``eigenvalues`` is the leading
    part, when a rule needing more than they hold keeps all of them)."""
    check_eps(eps)
    lam = eigenvalues.clamp_min(0)
    cumulative = torch.cumsum(lam, 0)
    if total is None:
        total = cumulative[-1]
    if total <= 0:
        return 1
    rank = int((cumulative < eps * total).sum().item()) + 1
    return min(rank, lam.numel())


def sorted_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix, eigenvalues descending. Returns (lam, V).

    Gram matrices of real activations can be badly conditioned (dead channels, zero padding give
    many repeated zero eigenvalues) and LAPACK's solver may then fail to converge: retry in
    float64, then with a jitter of 1e-10 * mean eigenvalue on the diagonal, which moves the
    eigenvalues by far less than any energy threshold can resolve.
    """
    work = gram.to(decomposition_dtype(gram.dtype))
    try:
        lam, vec = torch.linalg.eigh(work)
    except torch.linalg.LinAlgError:
        work = gram.to(torch.float64)
        try:
            lam, vec = torch.linalg.eigh(work)
        except torch.linalg.LinAlgError:
            n = work.shape[0]
            jitter = 1e-10 * torch.trace(work).abs().clamp_min(1e-30) / n
            lam, vec = torch.linalg.eigh(work + jitter * torch.eye(n, dtype=work.dtype,
                                                                   device=work.device))
        dtype = decomposition_dtype(gram.dtype)
        lam, vec = lam.to(dtype), vec.to(dtype)
    return lam.flip(0), vec.flip(1)


def top_eigenvectors(
    gram: Tensor, eps: Optional[float] = None, rank: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """Leading eigenvectors of a Gram matrix, by energy rule ``eps`` or fixed ``rank``.

    gram: (n, n). Returns (U contiguous (n, r), all eigenvalues descending (n,)).
    """
    if (eps is None) == (rank is None):
        raise ValueError("top_eigenvectors needs exactly one of eps= or rank=")
    lam, vec = sorted_eigh(gram)
    r = energy_rank(lam, eps) if eps is not None else max(1, min(int(rank), lam.numel()))
    return compact(vec[:, :r]), lam


def mode_basis(x: Tensor, mode: int, eps: float) -> Tensor:
    """Leading left singular vectors of X_(m) by the energy rule, for per-step HOSVD.

    When the mode is larger than the product of the others (a Linear layer's feature mode at a
    small batch), the small dual Gram X_(m)^T X_(m) is eigendecomposed instead and U = X V / sigma:
    same factors, a (rest x rest) instead of an (n x n) eigenproblem. Returns (n_m, r).
    """
    n = x.shape[mode]
    rest = x.numel() // n
    if n <= rest:
        return top_eigenvectors(mode_gram(x, mode), eps=eps)[0]
    a = x.movedim(mode, 0).reshape(n, rest).to(decomposition_dtype(x.dtype))
    lam, vec = sorted_eigh(a.t() @ a)
    r = energy_rank(lam, eps)
    sigma = lam[:r].clamp_min(torch.finfo(lam.dtype).tiny).sqrt()
    return orthonormalize((a @ vec[:, :r]) / sigma)


def orthonormalize(q: Tensor) -> Tensor:
    """Orthonormal basis of the column span of q: (n, r) -> (n, r), QR in float32 or better."""
    out_dtype = q.dtype
    basis, _ = torch.linalg.qr(q.to(decomposition_dtype(q.dtype)))
    return compact(basis.to(out_dtype))


def random_orthonormal(
    n: int, r: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Random (n, r) matrix with orthonormal columns, drawn from ``generator`` (never the global RNG)."""
    gaussian = torch.randn(n, r, generator=generator, dtype=decomposition_dtype(dtype))
    return orthonormalize(gaussian).to(device=device, dtype=dtype)


LOW_RANK_OVERSAMPLING = 8


def low_rank_eigh(gram: Tensor, rank_bound: int, seed: int = 0,
                  basis: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a PSD matrix C of rank <= ``rank_bound`` (a Gram summed from that many
    rows), or of C_res = (I - PP^T) C (I - PP^T) for an orthonormal ``basis`` P (d, k_P) without
    forming C_res; eigenvalues descending: (lam (k,), V (n, k)), k = min(n, rank_bound + 8); the
    other eigenvalues are 0. C Omega for a Gaussian Omega (n, k) spans range(C) exactly, so
    the eigenpairs of Q^T C Q (Q = orth(C Omega)) are those of C at O(n^2 k) instead of O(n^3)
    (the randomized range finder of Halko, Martinsson & Tropp, SIAM Review 2011, exact here
    because the rank is bounded).
    Omega comes from a private generator seeded by ``seed``. gram: (n, n)."""
    n = gram.shape[0]
    k = min(n, int(rank_bound) + LOW_RANK_OVERSAMPLING)
    p = None if basis is None or basis.shape[1] == 0 else basis
    if k >= n:
        return sorted_eigh(gram if p is None else complement_projector_apply(gram, p))
    work = decomposition_dtype(gram.dtype)
    c = gram.to(work)
    p = None if p is None else p.to(device=c.device, dtype=work)

    def off_basis(t: Tensor) -> Tensor:           # (I - PP^T) t
        return t if p is None else t - p @ (p.t() @ t)

    omega = torch.randn(n, k, generator=torch.Generator().manual_seed(int(seed)), dtype=work)
    q = off_basis(torch.linalg.qr(off_basis(c @ off_basis(omega.to(c.device))))[0])
    lam, v = sorted_eigh(q.t() @ c @ q)
    return lam, q @ v


def subspace_iteration(x: Tensor, mode: int, previous: Tensor) -> Tensor:
    """One warm-started subspace-iteration step (ASI Algorithm 1) on mode ``mode`` of ``x``:
    U = orth(X_(m) X_(m)^T U_prev), computed as X_(m) (X_(m)^T U_prev) without unfolding x.

    x: (..., n, ...), previous: (n, r) orthonormal. Returns (n, r) orthonormal.
    """
    work = decomposition_dtype(x.dtype)
    x = x.to(work)
    projected = mode_product(x, previous.to(work).t(), mode)     # X x_m U^T: r at ``mode``
    return orthonormalize(mode_contract(x, projected, mode))


def complement_projector_apply(gram: Tensor, basis: Optional[Tensor]) -> Tensor:
    """(I - P P^T) C (I - P P^T) for a symmetric C: (d, d) and orthonormal P: (d, k) (or None)."""
    if basis is None or basis.shape[1] == 0:
        return gram
    p = basis.to(gram.dtype)
    cp = gram - p @ (p.t() @ gram)
    return cp - (cp @ p) @ p.t()


def complement_basis(basis: Optional[Tensor], dim: int, dtype: torch.dtype = torch.float64,
                     device: Optional[torch.device] = None) -> Tensor:
    """Orthonormal basis (dim, dim - k) of the orthogonal complement of span(basis) (dim, k),
    on ``device`` (default: the basis' device, else the CPU)."""
    if device is None and basis is not None:
        device = basis.device
    if basis is None or basis.shape[1] == 0:
        return torch.eye(dim, dtype=dtype, device=device)
    p = basis.to(device=device, dtype=dtype)
    lam, vec = torch.linalg.eigh(torch.eye(dim, dtype=dtype, device=device) - p @ p.t())
    return compact(vec[:, lam > 0.5])


def grow_basis(gram: Tensor, basis: Optional[Tensor], eps: float,
               take_all: bool = False, max_rank: Optional[int] = None,
               rank_bound: Optional[int] = None) -> tuple[Tensor, float]:
    """New directions orthogonal to ``basis`` by the GPM energy rule.

    gram: C (d, d) of the inputs; basis: P (d, k) orthonormal or None. With E = tr(C) and
    a = (E - tr(C_res)) / E the energy P already covers (C_res = (I - PP^T) C (I - PP^T)), add
    eigenvectors of C_res (energy mu_i / E, descending) until a + sum mu_i / E >= eps.
    ``take_all`` returns the whole complement of P, ordered by energy (solved in complement
    coordinates, so zero-energy directions are orthogonal to P too). Only positive-energy
    directions are ever taken otherwise; they are re-orthogonalised against P in float64.
    ``max_rank``: at most that many directions (the leading ones; not with ``take_all``).
    ``rank_bound``: rank(C) is at most this (the rows summed into it); far below d the residual
    is decomposed by :func:`low_rank_eigh`, the same eigenpairs at a fraction of the cost.
    Returns (U (d, r) orthonormal, possibly r = 0; a), on the Gram's device (P may live
    elsewhere, e.g. on the CPU while the Gram was accumulated on a GPU).
    """
    check_eps(eps)
    work = torch.float64
    c = gram.to(work)
    d = c.shape[0]
    total = torch.trace(c)
    p = None if basis is None or basis.shape[1] == 0 else basis.to(device=c.device, dtype=work)
    if take_all:
        q = complement_basis(p, d, work, device=c.device)
        lam, vec = sorted_eigh(q.t() @ c @ q)
        covered = 1.0 if total <= 0 else float(((total - lam.clamp_min(0).sum()) / total).item())
        return compact(q @ vec), covered
    # float32 eigensolver (twice as fast on large fan-ins); the result is re-orthogonalised
    # against P and orthonormalised in float64 below
    if rank_bound is not None and 2 * (rank_bound + LOW_RANK_OVERSAMPLING) < d:
        lam, vec = low_rank_eigh(c.float() if d > 256 else c, rank_bound, basis=p)
    else:
        residual = complement_projector_apply(c, p)
        lam, vec = sorted_eigh(residual.float() if d > 256 else residual)
    lam, vec = lam.to(work).clamp_min(0), vec.to(work)
    covered = 1.0 if total <= 0 else float(((total - lam.sum()) / total).item())
    positive = int((lam > lam[0] * 1e-10).sum().item()) if lam.numel() and lam[0] > 0 else 0
    if covered >= eps or total <= 0 or positive == 0:
        return torch.zeros(d, 0, dtype=work, device=c.device), covered
    cumulative = covered + torch.cumsum(lam, 0) / total
    r = min(int((cumulative < eps).sum().item()) + 1, positive)
    if max_rank is not None:
        r = min(r, int(max_rank))
    u = vec[:, :r]
    if p is not None:
        u = u - p @ (p.t() @ u)
    return orthonormalize(u), covered


def residual_rank(mu: Tensor, energy: float, max_rank: Optional[int] = None,
                  total: Optional[float] = None) -> int:
    """Rank kept from a residual spectrum mu (n,) sorted descending: 0 when it holds no energy,
    else the energy rule on mu alone (:func:`energy_rank`, so >= 1) capped at ``max_rank``.
    ``total``: the energy of the whole spectrum when mu holds only its leading part (then a
    rule that needs more than mu holds keeps all of mu)."""
    lam = mu.clamp_min(0)
    if lam.numel() == 0 or lam.sum() <= 0:
        return 0
    rank = energy_rank(lam, energy, total)
    return rank if max_rank is None else min(rank, int(max_rank))


def training_subspace(gram: Tensor, basis: Optional[Tensor], energy: float,
                      max_rank: Optional[int] = None, take_all: bool = False,
                      min_residual: float = 1e-9,
                      rank_bound: Optional[int] = None) -> tuple[Tensor, float, float]:
    """Directions orthogonal to ``basis`` keeping ``energy`` of the *residual* energy tr(C_res).

    gram: C (d, d); basis: P (d, k) orthonormal or None. U holds the leading eigenvectors of
    C_res = (I - PP^T) C (I - PP^T) (those :func:`grow_basis` gives at eps = 1), as many as
    :func:`residual_rank` keeps of their energies mu_i = u_i^T C u_i, so rank >= 1 whenever
    tr(C_res) > ``min_residual`` * tr(C) (``rank_bound``: as in :func:`grow_basis`; below
    ``min_residual`` it is rounding noise of the projection:
    P is stored in float32). ``take_all``: the whole complement of P, no rule. Returns
    (U (d, r), a = energy P covers as in grow_basis, fraction of tr(C_res) inside span(U)).
    """
    check_eps(energy, "energy")
    # with a cap only the leading max_rank directions can be kept: the rest of the residual
    # spectrum enters through its total, tr(C_res) = (1 - a) tr(C), not its eigenvectors
    capped = max_rank is not None and not take_all
    u, covered = grow_basis(gram, basis, 1.0, take_all=take_all,
                            max_rank=max_rank if capped else None, rank_bound=rank_bound)
    if take_all:
        return u, covered, 1.0
    if u.shape[1] == 0 or 1.0 - covered <= min_residual:
        return u[:, :0], covered, 0.0
    c = gram.to(u)
    mu = ((c @ u) * u).sum(0)
    total = float(mu.clamp_min(0).sum())
    if capped:
        total = max(total, (1.0 - covered) * float(torch.trace(c)))
    r = residual_rank(mu, energy, max_rank, total=total if capped else None)
    kept = float(mu[:r].clamp_min(0).sum()) / total if r else 0.0
    return compact(u[:, :r]), covered, kept


def check_column_ratio(ratio: Optional[float]) -> Optional[float]:
    """Validate a Gram column ratio: None (every column) or a number > 0."""
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not float(ratio) > 0:
        raise ValueError(f"column_ratio={ratio!r}: pass a number > 0 (each batch adds at most "
                         f"ratio * n columns to a Gram of size n x n) or None for every column")
    return float(ratio)


def sampled_mode_gram(x: Tensor, mode: int, columns: int,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Unbiased estimate of X_(m) X_(m)^T from ``columns`` columns of the mode-``mode`` unfolding
    drawn uniformly without replacement: (N / columns) S S^T, S the (n, columns) sample of the N
    columns. Exact (:func:`mode_gram`) when columns >= N. ``generator``: a CPU generator for
    the draw (None: the global one). x: (..., n, ...) -> (n, n), float32 or better."""
    n = x.shape[mode]
    total = x.numel() // max(n, 1)
    if columns >= total:
        return mode_gram(x, mode)
    picked = torch.randperm(total, generator=generator)[: max(int(columns), 1)].to(x.device)
    moved = x.movedim(mode, -1)
    index = torch.unravel_index(picked, moved.shape[:-1])
    sample = moved[index].to(decomposition_dtype(x.dtype))      # (columns, n)
    return (sample.t() @ sample).mul_(total / picked.numel())


class GramAccumulator:
    """Running sum of X_(m) X_(m)^T for selected modes over calibration batches.

    Modes whose size changes between batches (the batch mode when the last batch is partial)
    cannot be summed and are recorded as such; callers decide what that means.

    ``column_ratio``: each batch adds at most ceil(ratio * n) columns of its mode-n unfolding,
    drawn without replacement and rescaled (:func:`sampled_mode_gram`), so the sum stays an
    unbiased estimate of the exact one at a fraction of its cost where a batch has many more
    columns than n (the patches of a conv); None: every column. The draws come from a private
    generator seeded by ``seed``: the global random stream does not move.
    """

    def __init__(self, modes: Sequence[int], column_ratio: Optional[float] = None, seed: int = 0):
        self.modes = tuple(modes)
        self.grams: dict[int, Tensor] = {}
        self.num_batches = 0
        self.inconsistent_modes: set[int] = set()
        self.columns: dict[int, int] = {}      # per mode: columns summed (a bound on the rank)
        self.column_ratio = check_column_ratio(column_ratio)
        self._generator: Optional[torch.Generator] = None
        if self.column_ratio is not None:
            self._generator = torch.Generator()
            self._generator.manual_seed(int(seed))

    def update(self, x: Tensor) -> None:
        """Add one batch. x: the activation in its layout's modes."""
        with torch.no_grad():
            for m in self.modes:
                available = x.numel() // max(x.shape[m], 1)
                if self.column_ratio is None:
                    g, used = mode_gram(x, m), available
                else:
                    used = min(available, math.ceil(self.column_ratio * x.shape[m]))
                    g = sampled_mode_gram(x, m, used, self._generator)
                if m not in self.grams:
                    self.grams[m] = g
                    self.columns[m] = used
                elif self.grams[m].shape != g.shape:
                    self.inconsistent_modes.add(m)
                else:
                    self.grams[m] += g
                    self.columns[m] += used
        self.num_batches += 1
