"""The method registry: a method defined and registered in this file alone works in ``compress``,
the accounting (report, measured bytes, FLOPs) and ``lance-cl bench``; FLOPs of the built-in
methods against hand counts and PyTorch's own FLOP counter; one helper per repeated idea."""
from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from typing import Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import FlopCounterMode

import lance_cl
from bench_fixtures import fashion_fixture
from lance_cl import METHODS, Compressor, cli, register_method
from lance_cl.core.tucker import projection_macs


class _Bf16InputLinear(torch.autograd.Function):
    """linear(x, W, b) whose backward keeps x in bfloat16 (2 bytes per element)."""

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x.to(torch.bfloat16), weight)
        ctx.has_bias = bias is not None

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x16, weight = ctx.saved_tensors
        gy = grad_output.reshape(-1, grad_output.shape[-1])
        x = x16.to(grad_output.dtype).reshape(-1, x16.shape[-1])
        grad_bias = gy.sum(0) if ctx.has_bias else None
        return grad_output @ weight, gy.t() @ x, grad_bias


class ToyBf16(Compressor):
    """Saves a Linear layer's input in bfloat16: a method that knows nothing of Tucker cores."""

    name = "toy_bf16"
    supported_layers = (nn.Linear,)
    uses_factors = False
    reads_activation = False
    bench_variants = ()

    def step_factors(self, view: Tensor) -> list[Optional[Tensor]]:
        return [None] * self.n_modes

    def layer_forward(self, layer, x: Tensor) -> Tensor:
        return _Bf16InputLinear.apply(x, layer.weight, layer.bias)

    def saved_bytes(self, layer, shape: Sequence[int]) -> int:
        return 2 * math.prod(shape)

    def step_macs(self, layer, shape: Sequence[int]) -> tuple[int, int]:
        return layer.dense_macs(layer, shape), math.prod(shape)     # one "MAC" per cast element


@pytest.fixture
def toy():
    register_method(ToyBf16)
    yield ToyBf16
    METHODS.pop(ToyBf16.name)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_toy_method_trains_with_bf16_inputs_and_exact_input_gradient(toy):
    model = _mlp()
    reference = _mlp().double()
    lance_cl.compress(model, "toy_bf16")
    x = torch.randn(4, 6)
    xr = x.double().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    model(xc).square().sum().backward()
    reference(xr).square().sum().backward()
    torch.testing.assert_close(xc.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)
    # grad_weight of the first layer = gy^T bf16(x), with gy from float64 autograd
    hidden = F.linear(xr, reference[0].weight, reference[0].bias).detach().requires_grad_(True)
    reference[2](F.relu(hidden)).square().sum().backward()
    expected = hidden.grad.t() @ x.to(torch.bfloat16).double()
    torch.testing.assert_close(model[0].weight.grad.double(), expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(x.to(torch.bfloat16).float(), x)          # the rounding is real


def test_toy_method_in_report_measurement_and_flops(toy):
    model = _mlp()
    rows = lance_cl.compress(model, "toy_bf16")
    assert [r.method for r in rows] == ["toy_bf16", "toy_bf16"]
    x = torch.randn(4, 6)
    stats = lance_cl.measure_activation_memory(model, x, lambda out: out.square().sum())
    assert stats["selected"] == 2 * 4 * (6 + 5)                 # bf16 copies of both inputs
    assert [r.bytes_after for r in lance_cl.report(model)] == [2 * 4 * 6, 2 * 4 * 5]
    assert [r.bytes_before for r in lance_cl.report(model)] == [4 * 4 * 6, 4 * 4 * 5]
    flops = lance_cl.layer_flops(model[0])
    assert flops["forward"] == flops["backward_input"] == flops["backward_weight"] == 2 * 4 * 6 * 5
    assert flops["compression"] == 2 * 4 * 6
    assert flops["total"] == 2 * (3 * 4 * 6 * 5 + 4 * 6)


def test_toy_method_names_the_layers_it_cannot_compress(toy):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"toy_bf16 applies to Linear only; choose .*for Conv2d"):
        lance_cl.compress(model, "toy_bf16")
    lance_cl.compress(model, "toy_bf16", layers=nn.Linear)
    assert model[2].compressor.name == "toy_bf16"


def test_toy_method_runs_in_the_bench(toy, tmp_path):
    root = fashion_fixture(tmp_path / "data", n=48)
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    assert "toy_bf16" in help_text.replace("\n", "").replace(" ", "")
    buf = io.StringIO()
    with redirect_stdout(buf):
        status = cli.main(["bench", "--data-root", str(root), "--out", str(tmp_path / "out"),
                           "--batch-size", "4", "--repeats", "1", "--warmup", "0",
                           "--train-steps", "1", "--threads", "1", "--models", "alexnet",
                           "--methods", "vanilla,toy_bf16"])
    assert status == 0
    toy_result = json.loads((tmp_path / "out" / "bench.json").read_text())[
        "results"]["alexnet"]["methods"]["toy_bf16"]
    assert toy_result["layers"] == ["fc1", "fc2"]               # only the Linear layers
    assert toy_result["memory"]["per_layer_measured"] == {"fc1": 2 * 4 * 1024, "fc2": 2 * 4 * 2048}
    assert toy_result["memory"]["selected"] == toy_result["memory"]["analytic_selected"]
    dense = 4 * 1024 * 2048 + 4 * 2048 * 2048
    assert toy_result["flops"]["total"] == 2 * (3 * dense + 4 * (1024 + 2048))
    assert "| alexnet | toy_bf16 |" in buf.getvalue()


# -- FLOPs of the built-in methods --------------------------------------------------------------

def _calibrated(module: nn.Module, x: Tensor, method: str = "lance", **options) -> nn.Module:
    model = nn.Sequential(module)
    lance_cl.compress(model, method, **options)
    lance_cl.calibrate(model, [x], progress=False)
    return model


def test_lance_linear_flops_by_hand():
    """x (5, 6) -> 4 outputs, fan-in rank 2: forward 5*6*4, grad_input 5*4*6, projection onto
    U (6, 2): 5*6*2, grad_weight: gy^T core (4x5)(5x2) = 40, lift (4x2)(2x6) = 48."""
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    model = _calibrated(nn.Linear(6, 4), x, rank=2)
    model(x.requires_grad_(True)).sum().backward()
    f = lance_cl.layer_flops(model[0])
    assert model[0].compressor.ranks() == (None, 2)
    assert (f["forward"], f["backward_input"]) == (2 * 120, 2 * 120)
    assert (f["compression"], f["backward_weight"]) == (2 * 60, 2 * (40 + 48))
    assert f["total"] == 776 and f["vanilla_total"] == 2 * 3 * 120


@pytest.mark.parametrize("layout", ["tensor", "patch"])
def test_lance_conv_flops_match_pytorchs_flop_counter(layout):
    """PyTorch's FlopCounterMode counts every matmul / conv of the real step, forward and
    backward: the analytic figure must be the same number."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    model = _calibrated(nn.Conv2d(3, 4, 3, padding=1), x, rank=2, layout=layout)
    xx = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        model(xx).square().sum().backward()
    f = lance_cl.layer_flops(model[0])
    assert f["total"] == counter.get_total_flops()
    assert f["vanilla_total"] == 2 * 3 * (2 * 4 * 5 * 5 * 3 * 9)     # B C_out H' W' C_in kh kw


def test_plain_and_gradient_filter_conv_flops_by_hand():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    f = lance_cl.layer_flops(conv, (2, 4, 9, 9))                  # output 5 x 5, 2 in-channels
    assert f["forward"] == f["backward_weight"] == 2 * (2 * 6 * 5 * 5 * 2 * 9)
    model = nn.Sequential(nn.Conv2d(2, 3, 3))
    lance_cl.compress(model, "gradient_filter", radius=2)
    g = lance_cl.layer_flops(model[0], (1, 2, 6, 6))                # output 4 x 4: 2 x 2 blocks
    # block means of x and of gy, then one (C_out x C_in) product per block
    assert g["compression"] == 2 * (2 * 6 * 6 + 3 * 4 * 4)
    assert g["backward_weight"] == 2 * (2 * 2 * 3 * 2)


def test_flops_of_an_asymmetric_padding_conv_use_the_padded_input_once():
    model = nn.Sequential(nn.Conv2d(1, 1, 2, padding="same"))       # pads 0 left/top, 1 right/bottom
    lance_cl.compress(model, "vanilla")
    model(torch.randn(1, 1, 4, 4, requires_grad=True)).sum().backward()
    assert model[0].last_input_shape == (1, 1, 5, 5)
    assert lance_cl.layer_flops(model[0])["forward"] == 2 * (4 * 4 * 4)
    assert lance_cl.layer_flops(model[0], (1, 1, 4, 4))["forward"] == 2 * (4 * 4 * 4)


def test_projection_macs_follow_the_cheapest_mode_order():
    # (4, 10, 3) onto ranks (-, 2, 3): mode 1 shrinks most (2/10), then mode 2 (3/3)
    macs, core = projection_macs((4, 10, 3), (None, 2, 3))
    assert core == [4, 2, 3]
    assert macs == 4 * 10 * 3 * 2 + 4 * 2 * 3 * 3


# -- shared helpers ------------------------------------------------------------------------------

def test_format_bytes_uses_binary_units():
    assert lance_cl.format_bytes(None) == "-" and lance_cl.format_bytes(None, "?") == "?"
    assert lance_cl.format_bytes(500) == "500 B"
    assert lance_cl.format_bytes(1536) == "1.50 KiB"
    assert lance_cl.format_bytes(3 * 2**20) == "3.00 MiB"
    assert lance_cl.format_bytes(5 * 2**30) == "5.00 GiB"


def test_preserved_train_modes_restores_each_modules_own_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    model.train()
    model[1].eval()                                    # a frozen BatchNorm inside a training model
    with lance_cl.preserved_train_modes(model):
        model.eval()
    assert model.training and model[0].training and not model[1].training and model[2].training
    with pytest.raises(RuntimeError):
        with lance_cl.preserved_train_modes(model):
            model.train()
            raise RuntimeError("boom")
    assert not model[1].training


def test_select_by_execution_order_keeps_each_modules_mode():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model.train()
    model[1].eval()
    lance_cl.compress(model, "vanilla", layers=1, example_inputs=torch.randn(4, 3))
    assert model.training and not model[1].training
    assert isinstance(model[2], lance_cl.layers.CompressedLayer)


def test_preserved_buffers_puts_running_statistics_back():
    bn = nn.BatchNorm1d(3)
    with lance_cl.train_modes.preserved_buffers([bn]):
        bn(torch.randn(8, 3) + 5.0)                     # a training-mode forward moves them
        assert bn.running_mean.abs().sum() > 0 and int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("padding,padding_mode", [(1, "zeros"), ("same", "zeros"), (1, "reflect")])
def test_patch_view_is_the_im2col_the_conv_multiplies(padding, padding_mode):
    """conv(x) = W.view(C_out, -1) @ patches: the patch view is the conv's own im2col."""
    from lance_cl.layers.conv2d import patch_view

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (2, 3), padding=padding, padding_mode=padding_mode, bias=False).double()
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    patches = patch_view(conv, x)
    out = conv(x)
    assert patches.shape == (2, 2 * 2 * 3, out.shape[2] * out.shape[3])
    torch.testing.assert_close(conv.weight.view(3, -1) @ patches, out.flatten(2))
