"""Mode algebra, energy rule, subspace iteration, budget solver and gradient filtering against
independent truths (numpy, brute force, explicit loops)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lance_cl.core.budget import BudgetTooSmallError, select_under_budget
from lance_cl.core.conv2d import ConvSpec, GradientFilterConv2dFunction
from lance_cl.core.linalg import (GramAccumulator, check_column_ratio, check_eps,
                                  complement_projector_apply, grow_basis, energy_rank,
                                  low_rank_eigh, mode_basis,
                                  mode_gram, orthonormalize, random_orthonormal, residual_rank,
                                  sampled_mode_gram, subspace_iteration, top_eigenvectors,
                                  training_subspace)
from lance_cl.core.tucker import (compact, core_shape, fold, mode_contract, mode_product, project, reconstruct,
                                  tucker_bytes, unfold)

DT = torch.float64


def test_unfold_matches_definition_and_fold_inverts():
    x = torch.arange(2 * 3 * 4, dtype=DT).reshape(2, 3, 4)
    a = unfold(x, 1)
    assert a.shape == (3, 8)
    # row i of X_(1) holds every entry with index i in mode 1
    for i in range(3):
        assert sorted(a[i].tolist()) == sorted(x[:, i, :].flatten().tolist())
    for m in range(3):
        torch.testing.assert_close(fold(unfold(x, m), m, x.shape), x)


@pytest.mark.parametrize("shape", [(3, 4, 5), (4, 7, 2), (2, 6, 3, 2)],
                         ids=["long_rows", "short_rows", "4d"])
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("same", [False, True], ids=["x_y", "gram"])
def test_mode_contract_equals_unfolded_product(shape, mode, same):
    x = torch.randn(*shape, dtype=DT)
    y = x if same else torch.randn(*(2 if m == mode else n for m, n in enumerate(x.shape)), dtype=DT)
    torch.testing.assert_close(mode_contract(x, y, mode), unfold(x, mode) @ unfold(y, mode).t())


def test_mode_product_against_einsum():
    x = torch.randn(2, 3, 4, dtype=DT)
    m = torch.randn(5, 3, dtype=DT)
    torch.testing.assert_close(mode_product(x, m, 1), torch.einsum("aib,ji->ajb", x, m))
    torch.testing.assert_close(unfold(mode_product(x, m, 1), 1), m @ unfold(x, 1))


def test_project_reconstruct_full_bases_is_identity_and_core_shape():
    x = torch.randn(3, 4, 5, dtype=DT)
    factors = [None, torch.linalg.qr(torch.randn(4, 4, dtype=DT))[0],
               torch.linalg.qr(torch.randn(5, 5, dtype=DT))[0]]
    torch.testing.assert_close(reconstruct(project(x, factors), factors), x)
    half = [None, factors[1][:, :2].contiguous(), None]
    assert project(x, half).shape == core_shape(x.shape, half) == (3, 2, 5)
    assert project(x, half).is_contiguous()


def test_tucker_bytes_counts_core_and_factors():
    u = torch.zeros(10, 3)
    assert tucker_bytes((4, 10, 6), [None, u, None], 4) == (4 * 3 * 6 + 30) * 4
    # a batch factor of another batch size does not apply: that mode stays full
    assert tucker_bytes((5, 10), [torch.zeros(4, 2), None], 2) == 5 * 10 * 2


@pytest.mark.parametrize("eps,expected", [(0.4, 1), (0.7, 2), (0.71, 3), (0.9, 3), (0.91, 4),
                                          (1.0, 4)])
def test_energy_rank_hand_computed(eps, expected):
    # cumulative energy of [4, 3, 2, 1] / 10: 0.4, 0.7, 0.9, 1.0
    assert energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=DT), eps) == expected


@pytest.mark.parametrize("eps,expected", [(0.2, 1), (0.3, 2), (0.45, 3), (0.5, 4), (0.9, 4)])
def test_energy_rank_of_a_leading_part_against_its_whole_spectrum(eps, expected):
    # [4, 3, 2, 1] lead a spectrum of total energy 20: cumulative 0.2, 0.35, 0.45, 0.5 of it;
    # a rule asking for more than the part holds keeps all four
    lead = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=DT)
    assert energy_rank(lead, eps, total=20.0) == expected


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, float("nan"), "0.5"])
def test_eps_outside_unit_interval_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        check_eps(bad)


def test_top_eigenvectors_match_numpy_svd():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 3)) @ rng.standard_normal((3, 40)) + 0.01 * rng.standard_normal((6, 40))
    x = torch.from_numpy(a)
    u, lam = top_eigenvectors(mode_gram(x, 0), eps=0.999)
    un, s, _ = np.linalg.svd(a, full_matrices=False)
    np.testing.assert_allclose(lam.numpy(), s ** 2, rtol=1e-9, atol=1e-9)
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    assert u.shape[1] == int(np.searchsorted(energy, 0.999) + 1)
    # same subspace: projectors agree
    r = u.shape[1]
    np.testing.assert_allclose((u @ u.T).numpy(), un[:, :r] @ un[:, :r].T, atol=1e-8)


@pytest.mark.parametrize("rank", [1, 2])
def test_truncated_factors_own_exactly_their_storage(rank):
    # a single column of a column-major eigenvector matrix is "contiguous" yet holds all of it
    gram = mode_gram(torch.randn(6, 30), 0)
    u, _ = top_eigenvectors(gram, rank=rank)
    assert u.untyped_storage().nbytes() == 6 * rank * 4
    view = torch.linalg.eigh(gram)[1][:, :1]
    assert view.is_contiguous() and view.untyped_storage().nbytes() == 36 * 4
    assert compact(view).untyped_storage().nbytes() == 6 * 4
    torch.testing.assert_close(compact(view), view)


@pytest.mark.parametrize("shape,mode", [((6, 40), 1), ((40, 6), 1), ((3, 30, 2), 1), ((4, 5, 6), 0)])
def test_mode_basis_primal_and_dual_agree_with_svd(shape, mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=DT)
    u = mode_basis(x, mode, 0.8)
    a = unfold(x, mode)
    left, s, _ = torch.linalg.svd(a, full_matrices=False)
    energy = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    r = int((energy < 0.8).sum()) + 1
    assert u.shape == (x.shape[mode], r)
    torch.testing.assert_close(u @ u.t(), left[:, :r] @ left[:, :r].t(), atol=1e-8, rtol=0)


def test_gram_accumulator_equals_gram_of_concatenation():
    batches = [torch.randn(5, 3, 4, dtype=DT) for _ in range(3)] + [torch.randn(2, 3, 4, dtype=DT)]
    acc = GramAccumulator(modes=(0, 1, 2))
    for b in batches:
        acc.update(b)
    full = torch.cat(batches)
    torch.testing.assert_close(acc.grams[1], mode_gram(full, 1))
    torch.testing.assert_close(acc.grams[2], mode_gram(full, 2))
    assert acc.num_batches == 4
    assert 0 in acc.inconsistent_modes       # the partial last batch cannot join the batch Gram
    torch.testing.assert_close(acc.grams[0], sum(mode_gram(b, 0) for b in batches[:3]))


def test_sampled_gram_is_exact_with_every_column_and_unbiased_with_fewer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, generator=g, dtype=DT) * torch.tensor([3.0, 1.0, 0.2, 0.5], dtype=DT)
    exact = unfold(x, 2) @ unfold(x, 2).t()
    torch.testing.assert_close(sampled_mode_gram(x, 2, 15, g), exact)     # 15 = all columns
    # fewer columns: an unbiased estimate, so the mean of many draws approaches the exact Gram
    draws = torch.stack([sampled_mode_gram(x, 2, 4, g) for _ in range(4000)])
    assert float((draws.mean(0) - exact).norm() / exact.norm()) < 0.03
    # one draw is (N / K) times the Gram of K distinct columns: those a uniform permutation of
    # the N columns (mode-2 fibres x[i, j, :], in row-major order of (i, j)) puts first
    one = sampled_mode_gram(x, 2, 4, torch.Generator().manual_seed(5))
    picked = torch.randperm(15, generator=torch.Generator().manual_seed(5))[:4]
    fibres = torch.stack([x[int(k) // 3, int(k) % 3, :] for k in picked])  # (4, 4)
    torch.testing.assert_close(one, fibres.t() @ fibres * (15 / 4))


def test_gram_accumulator_with_a_column_ratio_samples_privately():
    batches = [torch.randn(6, 5, 9, dtype=DT) for _ in range(3)]
    exact, wide, narrow = GramAccumulator((1, 2)), GramAccumulator((1, 2), column_ratio=100.0), \
        GramAccumulator((1, 2), column_ratio=1.0, seed=3)
    state = torch.get_rng_state()
    for b in batches:
        for acc in (exact, wide, narrow):
            acc.update(b)
    assert torch.equal(torch.get_rng_state(), state)            # the global stream did not move
    for m in (1, 2):
        torch.testing.assert_close(wide.grams[m], exact.grams[m])     # ratio * n >= every column
    again = GramAccumulator((1, 2), column_ratio=1.0, seed=3)
    for b in batches:
        again.update(b)
    torch.testing.assert_close(again.grams[1], narrow.grams[1], rtol=0, atol=0)   # reproducible
    assert not torch.allclose(narrow.grams[1], exact.grams[1])   # 5 of 54 columns per batch
    assert exact.columns == {1: 3 * 54, 2: 3 * 30} and narrow.columns == {1: 3 * 5, 2: 3 * 9}
    assert torch.linalg.eigvalsh(narrow.grams[1]).min() > -1e-9


@pytest.mark.parametrize("bad", [0, -1.0, True, "2"])
def test_column_ratio_outside_positive_numbers_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="column_ratio"):
        check_column_ratio(bad)
    assert check_column_ratio(None) is None and check_column_ratio(2) == 2.0


def test_subspace_iteration_step_and_convergence():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=DT))[0]
    spectrum = torch.tensor([10.0, 8.0, 6.0] + [0.1] * 17, dtype=DT)
    a = basis @ torch.diag(spectrum) @ torch.randn(20, 50, generator=g, dtype=DT) / 7
    u0 = random_orthonormal(20, 3, torch.Generator().manual_seed(1), DT)
    u1 = subspace_iteration(a, 0, u0)
    # one step = orth(A A^T U0): same column span as the explicit product
    q = torch.linalg.qr(a @ a.t() @ u0)[0]
    torch.testing.assert_close(u1 @ u1.t(), q @ q.t())
    torch.testing.assert_close(u1.t() @ u1, torch.eye(3, dtype=DT))
    u = u1
    for _ in range(30):
        u = subspace_iteration(a, 0, u)
    top = torch.linalg.svd(a)[0][:, :3]
    torch.testing.assert_close(u @ u.t(), top @ top.t(), atol=1e-6, rtol=0)


def test_random_starts_never_touch_the_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    random_orthonormal(10, 3, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())
    a = random_orthonormal(10, 3, torch.Generator().manual_seed(0))
    b = random_orthonormal(10, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_orthonormalize_low_precision_runs_in_float32():
    q = orthonormalize(torch.randn(16, 4).to(torch.bfloat16))
    assert q.dtype == torch.bfloat16
    torch.testing.assert_close(q.float().t() @ q.float(), torch.eye(4), atol=2e-2, rtol=0)


@pytest.mark.parametrize("eps,expected_rank", [(0.5, 0), (0.8, 1), (0.81, 2), (0.95, 3)])
def test_grow_basis_hand_computed(eps, expected_rank):
    # energies 5, 3, 1, 1 along a random orthonormal frame; P holds the first direction
    frame = torch.linalg.qr(torch.randn(4, 4, dtype=DT))[0]
    c = frame @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=DT)) @ frame.t()
    u, covered = grow_basis(c, frame[:, :1], eps)
    assert covered == pytest.approx(0.5)
    assert u.shape == (4, expected_rank)
    if expected_rank:
        assert (u.t() @ frame[:, :1]).abs().max() < 1e-12
        torch.testing.assert_close(u.t() @ u, torch.eye(expected_rank, dtype=DT))
        # the first new direction is the next most energetic one
        assert abs(float(u[:, 0] @ frame[:, 1])) == pytest.approx(1.0)


def test_grow_basis_take_all_is_the_whole_complement_even_without_energy():
    c = torch.zeros(5, 5, dtype=DT)
    c[0, 0] = 1.0                                       # energy only along e0
    p = torch.eye(5, dtype=DT)[:, :2]
    u, _ = grow_basis(c, p, 0.9, take_all=True)
    assert u.shape == (5, 3)
    assert (u.t() @ p).abs().max() < 1e-12
    torch.testing.assert_close(u @ u.t() + p @ p.t(), torch.eye(5, dtype=DT))
    u0, covered = grow_basis(c, None, 0.9)
    assert covered == pytest.approx(0.0) and u0.shape == (5, 1)


@pytest.mark.parametrize("energy,max_rank,expected", [
    (0.65, None, 2),    # 4 < 6.5 <= 4 + 3
    (0.71, None, 3),    # 7 < 7.1 <= 9
    (1.0, None, 4),
    (0.01, None, 1),
    (0.95, 2, 2),       # capped
])
def test_residual_rank_hand_computed(energy, max_rank, expected):
    assert residual_rank(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=DT), energy, max_rank) == expected


def test_residual_rank_is_zero_only_without_energy():
    assert residual_rank(torch.zeros(3, dtype=DT), 0.9) == 0
    assert residual_rank(torch.zeros(0, dtype=DT), 0.9) == 0
    assert residual_rank(torch.tensor([1e-20, 0.0], dtype=DT), 0.9) == 1


@pytest.mark.parametrize("energy,max_rank,expected_rank,kept", [
    (0.5, None, 1, 0.6), (0.61, None, 2, 0.8), (0.9, None, 3, 1.0),
    (0.9, 2, 2, 0.8), (0.5, 3, 1, 0.6), (0.61, 3, 2, 0.8),
])
def test_training_subspace_keeps_a_fraction_of_the_residual_energy(energy, max_rank,
                                                                   expected_rank, kept):
    # energies 5, 3, 1, 1; P holds the first direction: residual energies 3, 1, 1 (sum 5)
    frame = torch.linalg.qr(torch.randn(4, 4, dtype=DT))[0]
    c = frame @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=DT)) @ frame.t()
    u, covered, fraction = training_subspace(c, frame[:, :1], energy, max_rank)
    assert covered == pytest.approx(0.5) and fraction == pytest.approx(kept)
    assert u.shape == (4, expected_rank)
    assert (u.t() @ frame[:, :1]).abs().max() < 1e-12
    torch.testing.assert_close(u.t() @ u, torch.eye(expected_rank, dtype=DT))
    assert abs(float(u[:, 0] @ frame[:, 1])) == pytest.approx(1.0)
    if energy == 0.5:     # GPM's total-energy rule at the same number freezes the layer
        # (P covers exactly 50 %: compare just below it, the rounding of tr(C_res) decides at it)
        assert grow_basis(c, frame[:, :1], energy - 1e-9)[0].shape[1] == 0


@pytest.mark.parametrize("energy,cap", [(0.3, 40), (0.95, 12), (1.0, 25)])
def test_a_capped_training_subspace_is_the_leading_part_of_the_uncapped_one(energy, cap):
    """The cap keeps only the leading directions (the rest enters through tr(C_res)): the same
    rank as min(uncapped rank, cap), the same span, the same kept fraction."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(60, 200, generator=g, dtype=DT) * torch.linspace(3, 0.1, 60, dtype=DT).view(-1, 1)
    c = a @ a.t()
    p = torch.linalg.qr(torch.randn(60, 10, generator=g, dtype=DT))[0]
    u_all, covered_all, _ = training_subspace(c, p, energy)
    u, covered, kept = training_subspace(c, p, energy, cap)
    r = min(u_all.shape[1], cap)
    assert u.shape == (60, r) and covered == pytest.approx(covered_all)
    torch.testing.assert_close(u @ u.t(), u_all[:, :r] @ u_all[:, :r].t(), atol=1e-8, rtol=0)
    residual = c - p @ (p.t() @ c)
    residual = residual - (residual @ p) @ p.t()
    assert kept == pytest.approx(float(torch.trace(u.t() @ c @ u) / torch.trace(residual)), rel=1e-9)


def test_low_rank_eigh_recovers_the_eigenpairs_of_a_rank_bounded_gram():
    g = torch.Generator().manual_seed(8)
    rows = torch.randn(12, 50, generator=g, dtype=DT) * torch.linspace(4, 0.5, 12, dtype=DT).view(-1, 1)
    c = rows.t() @ rows                                        # (50, 50), rank 12
    lam, vec = low_rank_eigh(c, rank_bound=12)
    assert lam.shape == (20,) and vec.shape == (50, 20)        # 12 + 8 oversampling
    exact = torch.linalg.eigvalsh(c).flip(0)
    torch.testing.assert_close(lam[:12], exact[:12], rtol=1e-9, atol=1e-9)
    assert lam[12:].abs().max() < 1e-9
    torch.testing.assert_close(vec[:, :12] * lam[:12] @ vec[:, :12].t(), c, rtol=0, atol=1e-8)
    torch.testing.assert_close(low_rank_eigh(c, rank_bound=45)[0], exact)   # too high: full eigh


@pytest.mark.parametrize("eps", [0.5, 0.9, 0.999])
def test_grow_basis_with_a_rank_bound_gives_the_same_directions(eps):
    g = torch.Generator().manual_seed(9)
    rows = torch.randn(20, 300, generator=g, dtype=DT) * torch.linspace(3, 0.2, 20, dtype=DT).view(-1, 1)
    c = rows.t() @ rows
    p = torch.linalg.qr(torch.randn(300, 30, generator=g, dtype=DT))[0]
    u, covered = grow_basis(c, p, eps)
    u_low, covered_low = grow_basis(c, p, eps, rank_bound=20)
    assert u_low.shape == u.shape and covered_low == pytest.approx(covered, rel=1e-5)
    torch.testing.assert_close(u_low @ u_low.t(), u @ u.t(), atol=1e-4, rtol=0)   # float32 solver
    assert (u_low.t() @ p).abs().max() < 1e-10


def test_training_subspace_is_empty_when_the_basis_covers_everything():
    frame = torch.linalg.qr(torch.randn(6, 6, dtype=DT))[0]
    c = frame @ torch.diag(torch.arange(6, 0, -1, dtype=DT)) @ frame.t()
    for basis in (frame, frame.float()):          # float32 bases leave only rounding noise
        u, covered, fraction = training_subspace(c, basis, 1.0)
        assert u.shape == (6, 0) and fraction == 0.0 and covered == pytest.approx(1.0)
    u, _, fraction = training_subspace(c, frame[:, :2], 0.9, take_all=True)
    assert u.shape == (6, 4) and fraction == 1.0


def test_complement_projection():
    c = torch.randn(6, 6, dtype=DT)
    c = c @ c.t()
    p = torch.linalg.qr(torch.randn(6, 2, dtype=DT))[0]
    proj = torch.eye(6, dtype=DT) - p @ p.t()
    torch.testing.assert_close(complement_projector_apply(c, p), proj @ c @ proj)


# ---------------------------------------------------------------------------------------------
# budget solver

def brute_force(options, budget):
    best, pick = float("inf"), None
    for combo in itertools.product(*[range(len(o)) for o in options]):
        mem = sum(options[i][j][0] for i, j in enumerate(combo))
        err = sum(options[i][j][1] for i, j in enumerate(combo))
        if mem <= budget and err < best:
            best, pick = err, combo
    return best, pick


@pytest.mark.parametrize("seed", range(5))
def test_budget_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    options = []
    for _ in range(5):
        mem = np.sort(rng.uniform(10, 100, size=4))
        err = np.sort(rng.uniform(0, 5, size=4))[::-1]      # more memory, less error
        options.append(list(zip(mem.tolist(), err.tolist())))
    budget = float(sum(o[0][0] for o in options) + rng.uniform(20, 150))
    picks = select_under_budget(options, budget, resolution=20000)
    err = sum(options[i][j][1] for i, j in enumerate(picks))
    mem = sum(options[i][j][0] for i, j in enumerate(picks))
    best, _ = brute_force(options, budget)
    assert mem <= budget
    assert err == pytest.approx(best, rel=1e-3, abs=0.02)


def test_budget_twenty_layers_is_feasible_and_beats_minimum_memory_choice():
    rng = np.random.default_rng(1)
    options = [list(zip(np.sort(rng.uniform(1e3, 1e5, 6)).tolist(),
                        np.sort(rng.uniform(0, 1, 6))[::-1].tolist())) for _ in range(20)]
    budget = sum(o[2][0] for o in options)
    picks = select_under_budget(options, budget)
    assert sum(options[i][j][0] for i, j in enumerate(picks)) <= budget
    # at least as good as the feasible all-third-option combination
    assert sum(options[i][j][1] for i, j in enumerate(picks)) <= sum(o[2][1] for o in options)


def test_budget_below_minimum_is_a_clear_error():
    with pytest.raises(BudgetTooSmallError, match="at least 30"):
        select_under_budget([[(10, 1.0), (20, 0.5)], [(20, 1.0)]], budget=25)


# ---------------------------------------------------------------------------------------------
# gradient filtering

def filtered_weight_grad_loop(x, gy, w_shape, spec, radius):
    """Independent, loop-based statement of the gradient-filter rule (see filtered_input)."""
    c_out, c_group, kh, kw = w_shape
    ph, pw = spec.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    sh, sw = spec.stride
    ho, wo = gy.shape[-2:]
    dw = torch.zeros(c_out, c_group, dtype=x.dtype)
    og = c_out // spec.groups
    for b in range(x.shape[0]):
        for i in range(0, ho, radius):
            for j in range(0, wo, radius):
                region = xp[b, :, i * sh:(i + radius) * sh, j * sw:(j + radius) * sw]
                mean = torch.zeros(x.shape[1], dtype=x.dtype)
                mean += region.sum((1, 2)) / (radius * sh * radius * sw)
                gsum = gy[b, :, i:i + radius, j:j + radius].sum((1, 2))
                for o in range(c_out):
                    g = o // og
                    dw[o] += gsum[o] * mean[g * c_group:(g + 1) * c_group]
    return dw[:, :, None, None].expand(w_shape)


@pytest.mark.parametrize("case", [(4, 6, 3, 1, 1, 1), (4, 6, 3, 2, 1, 1), (4, 8, 3, 1, 1, 2),
                                  (4, 4, 3, 1, 1, 4)])
def test_gradient_filter_against_loop_definition(case):
    c_in, c_out, k, s, p, g = case
    spec = ConvSpec.build((k, k), s, p, 1, g)
    x = torch.randn(2, c_in, 9, 7, dtype=DT, requires_grad=True)
    w = torch.randn(c_out, c_in // g, k, k, dtype=DT, requires_grad=True)
    y, _ = GradientFilterConv2dFunction.apply(x, w, None, spec, 2)
    gy = torch.randn_like(y)
    y.backward(gy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = F.conv2d(x2, w2, None, s, p, 1, g)
    y2.backward(gy)
    torch.testing.assert_close(y, y2)                  # exact output
    torch.testing.assert_close(x.grad, x2.grad)        # exact grad_input
    torch.testing.assert_close(w.grad, filtered_weight_grad_loop(x.detach(), gy, w.shape, spec, 2))


def test_gradient_filter_radius_one_pointwise_is_exact():
    spec = ConvSpec.build((1, 1), 1, 0, 1, 1)
    x = torch.randn(3, 4, 5, 5, dtype=DT)
    w = torch.randn(6, 4, 1, 1, dtype=DT, requires_grad=True)
    y, _ = GradientFilterConv2dFunction.apply(x, w, None, spec, 1)
    gy = torch.randn_like(y)
    y.backward(gy)
    w2 = w.detach().clone().requires_grad_()
    F.conv2d(x, w2).backward(gy)
    torch.testing.assert_close(w.grad, w2.grad)


def test_sorted_eigh_recovers_when_the_solver_fails(monkeypatch):
    real = torch.linalg.eigh
    calls = []

    def flaky(a, *args, **kwargs):
        calls.append(a.dtype)
        if len(calls) < 3:   # float32 fails, float64 fails, jittered float64 succeeds
            raise torch.linalg.LinAlgError("failed to converge")
        return real(a, *args, **kwargs)

    from lance_cl.core import linalg
    c = torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0]))
    monkeypatch.setattr(linalg.torch.linalg, "eigh", flaky)
    lam, vec = linalg.sorted_eigh(c)
    assert calls == [torch.float32, torch.float64, torch.float64]
    assert lam.dtype == torch.float32
    torch.testing.assert_close(lam, torch.tensor([3.0, 1.0, 0.0, 0.0]), atol=1e-8, rtol=0)
    assert abs(float(vec[0, 0])) == pytest.approx(1.0)
