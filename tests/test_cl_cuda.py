"""Continual-learning runs on CUDA (skipped where no GPU is present): every recipe trains,
checkpoints and resumes with the model on the GPU while the CL state stays on the CPU."""
from __future__ import annotations

import math

import pytest
import torch

from lance_cl.cl.runner import checkpoint_path, run_experiment
from lance_cl.core.linalg import grow_basis

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_grow_basis_with_a_gpu_gram_and_a_cpu_basis() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 12, generator=g, dtype=torch.float64)
    gram = (a.t() @ a).cuda()
    p = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))[0].float()
    for take_all in (False, True):
        u, covered = grow_basis(gram, p, 0.99, take_all=take_all)
        assert u.device.type == "cuda" and 0.0 <= covered <= 1.0
        torch.testing.assert_close(p.double().cuda().t() @ u, torch.zeros(3, u.shape[1], dtype=u.dtype,
                                                                           device="cuda"), atol=1e-6, rtol=0)
    empty, _ = grow_basis(gram, torch.linalg.qr(a.t())[0][:, :12].float(), 0.5)
    assert empty.shape == (12, 0) and empty.device.type == "cuda"


@pytest.mark.parametrize("strategy", ["lance", "lance_paper", "gpm", "sgp", "naive", "agem", "joint"])
def test_recipe_trains_and_resumes_on_cuda(tmp_path, strategy) -> None:  # type: ignore[no-untyped-def]
    kw = dict(epochs=1, quick=True, progress=False, device="cuda")
    run_experiment("split_digits", strategy, 0, out_dir=tmp_path, max_tasks=2, **kw)
    resumed = run_experiment("split_digits", strategy, 0, out_dir=tmp_path, **kw)
    assert resumed["status"] == "complete" and resumed["completed_tasks"] == 5
    assert all(math.isfinite(v) for row in resumed["accuracy_matrix"] for v in row)
    ckpt = torch.load(checkpoint_path(tmp_path, "split_digits", strategy, 0),
                      map_location="cpu", weights_only=False)
    for state in ckpt["strategy"].values():
        for basis in state.get("bases", {}).values():
            torch.testing.assert_close(basis.t() @ basis, torch.eye(basis.shape[1]), atol=1e-4, rtol=0)
