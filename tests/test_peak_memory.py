"""Peak memory of one training step against tensor sizes counted by hand.

Model: out = relu(x @ W1) @ W2 (x: B x D, W1: D x H, W2: H x O), loss = out.sum(). Walking
autograd by hand, in elements (x, W1, W2 exist before the step and are not counted):

* forward keeps h = relu(x @ W1) (B x H, saved by relu and the second mm), ``out`` (B x O, the
  caller's reference) and the loss (1); x @ W1 is freed once relu has run;
* backward: seed (1), W2.grad (H x O), grad_h (B x H), then relu's grad_a (B x H) while h and
  grad_h are still alive: 3BH + HO + BO + 2 elements live at once;
* then h and grad_h go, W1.grad (D x H) arrives: BH + HO + DH + BO + 2.

The peak is the larger of the two; the allocator may add a scalar or a short-lived copy, hence a
small slack on top (never below the bound).
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lance_cl.accounting import measure_activation_memory, measure_peak_step_memory

SLACK = 64  # bytes: scalars / alignment the allocator may add


class SaveCopies(torch.autograd.Function):
    """Identity that saves ``k`` extra copies of its input (k x its bytes, alive until its
    backward runs)."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(*[x.clone() for _ in range(k)])
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return g, None


class BigTemporary(torch.autograd.Function):
    """Identity whose backward allocates an ``n``-element temporary and frees it (saves nothing)."""

    @staticmethod
    def forward(ctx, x: Tensor, n: int) -> Tensor:  # type: ignore[override]
        ctx.n = n
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        tmp = torch.ones(ctx.n, dtype=g.dtype)
        return g * tmp[0], None   # a new B x O tensor while tmp is alive


class TwoLayer(nn.Module):
    """relu(x @ W1) @ W2, optionally with k saved copies of x @ W1 or a backward temporary."""

    def __init__(self, d: int, h: int, o: int, dtype: torch.dtype, copies: int = 0,
                 temporary: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W1 = nn.Parameter(torch.randn(d, h, generator=g, dtype=dtype))
        self.W2 = nn.Parameter(torch.randn(h, o, generator=g, dtype=dtype))
        self.copies, self.temporary = copies, temporary

    def forward(self, x: Tensor) -> Tensor:
        a = x @ self.W1
        if self.copies:
            a = SaveCopies.apply(a, self.copies)
        out = a.relu() @ self.W2
        return BigTemporary.apply(out, self.temporary) if self.temporary else out


def _loss(out: Tensor) -> Tensor:
    return out.sum()


def _hand_peak(b: int, d: int, h: int, o: int) -> int:
    """Elements live at the peak (module docstring)."""
    return max(3 * b * h + h * o + b * o + 2, b * h + h * o + d * h + b * o + 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,d,h,o", [(16, 8, 64, 4),     # relu's backward is the peak
                                     (4, 128, 32, 4)])   # W1.grad's arrival is the peak
def test_peak_matches_hand_count(dtype: torch.dtype, b: int, d: int, h: int, o: int) -> None:
    model, x = TwoLayer(d, h, o, dtype), torch.randn(b, d, dtype=dtype)
    es = x.element_size()
    bound = es * _hand_peak(b, d, h, o)
    res = measure_peak_step_memory(model, x, _loss)
    assert res["device"] == "cpu" and res["source"] == "profiler"
    assert bound <= res["peak_bytes"] <= bound + SLACK
    # one pass with the saved-tensor hooks sees the same peak, and the saved bytes are h and x
    stats = measure_activation_memory(model, x, _loss, layers=[])
    assert stats["peak_bytes"] == res["peak_bytes"]
    assert stats["total"] == es * (b * h + b * d)


def test_extra_saved_copies_raise_the_peak_by_their_bytes() -> None:
    b, d, h, o = 16, 8, 64, 4
    x = torch.randn(b, d)
    one = measure_activation_memory(TwoLayer(d, h, o, torch.float32, copies=1), x, _loss, layers=[])
    two = measure_activation_memory(TwoLayer(d, h, o, torch.float32, copies=2), x, _loss, layers=[])
    # the copies live until their node's backward, after relu's: on top of the hand-counted peak
    assert two["total"] - one["total"] == 4 * b * h
    assert two["peak_bytes"] - one["peak_bytes"] == 4 * b * h
    bound = 4 * (_hand_peak(b, d, h, o) + 2 * b * h)
    assert bound <= two["peak_bytes"] <= bound + SLACK


def test_backward_temporary_is_in_the_peak_not_in_the_saved_bytes() -> None:
    b, d, h, o, n = 16, 8, 64, 4, 50_000
    x = torch.randn(b, d)
    plain = measure_activation_memory(TwoLayer(d, h, o, torch.float32), x, _loss, layers=[])
    temp = measure_activation_memory(TwoLayer(d, h, o, torch.float32, temporary=n), x, _loss, layers=[])
    assert temp["total"] == plain["total"]
    # first backward node: h, out, loss, seed, tmp and the returned B x O gradient coexist
    bound = 4 * (b * h + 2 * b * o + 2 + n)
    assert bound <= temp["peak_bytes"] <= bound + SLACK
    assert temp["peak_bytes"] > plain["peak_bytes"] + 4 * n // 2


def test_existing_grads_are_set_aside_and_put_back() -> None:
    b, d, h, o = 16, 8, 64, 4
    model, x = TwoLayer(d, h, o, torch.float32), torch.randn(b, d)
    fresh = measure_peak_step_memory(model, x, _loss)["peak_bytes"]
    assert model.W1.grad is None and model.W2.grad is None
    old = torch.full_like(model.W1, 7.0)
    model.W1.grad = old
    again = measure_activation_memory(model, x, _loss, layers=[])
    assert again["peak_bytes"] == fresh          # W1.grad is allocated anew, counted again
    assert model.W1.grad is old and bool((old == 7.0).all()) and model.W2.grad is None


def test_inside_another_profiler_session_the_peak_is_none() -> None:
    model, x = TwoLayer(8, 16, 4, torch.float32), torch.randn(4, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        with pytest.warns(RuntimeWarning, match="already running"):
            stats = measure_activation_memory(model, x, _loss, layers=[])
    assert stats["peak_bytes"] is None and stats["total"] > 0
    assert measure_activation_memory(model, x, _loss, peak=False)["peak_bytes"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_from_allocator_statistics() -> None:
    b, d, h, o = 256, 64, 512, 8
    model = TwoLayer(d, h, o, torch.float32).cuda()
    x = torch.randn(b, d, device="cuda")
    stats = measure_activation_memory(model, x, _loss, layers=[])
    bound = 4 * _hand_peak(b, d, h, o)
    # the caching allocator rounds every block up to 512 bytes
    assert bound <= stats["peak_bytes"] <= bound + 8 * 512
    assert stats["cuda_peak"] is not None and stats["cuda_peak"] < stats["peak_bytes"]
    res = measure_peak_step_memory(model, x, _loss)
    assert res["source"] == "cuda_allocator" and res["peak_bytes"] == stats["peak_bytes"]
