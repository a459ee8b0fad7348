"""`lance-cl bench` end to end on a tiny FashionMNIST written in the real idx.gz format.

The numbers are checked against truths computed here by hand from the layer shapes, not against
the library's own accounting: vanilla's saved bytes are the layer inputs, lance's are its cores
plus factors, vanilla's FLOPs are the textbook 3 x 2 x MACs, ratios are recomputed from the raw
figures, and the fidelity helpers are checked on vectors and a model whose gradient is known in
closed form.
"""
from __future__ import annotations

import io
import json
import math
import statistics
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench_fixtures import fashion_fixture
from lance_cl import METHODS, cli
from lance_cl.benchmarks.perf_measure import cosine_fidelity, weight_grads

B = 4          # batch size of the tiny run
N_IMAGES = 48  # 8 calibration batches + the measured batch + training images
REPEATS = 2

# AlexNet-5 inputs of the compressed layers for 32x32x3 images (GPM geometry)
ALEX_INPUTS = {"conv1": (3, 32, 32), "conv2": (64, 14, 14), "conv3": (128, 6, 6),
               "fc1": (1024,), "fc2": (2048,)}
VANILLA_BYTES = 4 * B * sum(math.prod(s) for s in ALEX_INPUTS.values())   # 372736 = 364 KiB
# multiply-adds of one forward: B x C_out x H' x W' x C_in x kh x kw, B x in x out
ALEX_MACS = {
    "conv1": B * 64 * 29 * 29 * 3 * 4 * 4,
    "conv2": B * 128 * 12 * 12 * 64 * 3 * 3,
    "conv3": B * 256 * 5 * 5 * 128 * 2 * 2,
    "fc1": B * 1024 * 2048,
    "fc2": B * 2048 * 2048,
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, str]:
    base = tmp_path_factory.mktemp("bench")
    root = fashion_fixture(base / "data", n=N_IMAGES)
    out = base / "out"
    buf = io.StringIO()
    with redirect_stdout(buf):
        status = cli.main(["bench", "--data-root", str(root), "--out", str(out), "--batch-size", str(B),
                           "--repeats", str(REPEATS), "--warmup", "0", "--train-steps", "2",
                           "--threads", "1", "--models", "alexnet",
                           "--methods", "vanilla,lance,asi,gradient_filter"])
    assert status == 0
    assert (out / "bench.md").read_text().startswith("Machine:")
    return json.loads((out / "bench.json").read_text()), buf.getvalue()


def test_each_method_compresses_the_layers_it_supports(bench) -> None:
    result, _ = bench
    res = result["results"]["alexnet"]
    assert res["compressed_layers"] == list(ALEX_INPUTS)        # every trained layer but the head
    for method in ("vanilla", "lance", "asi"):
        assert res["methods"][method]["layers"] == list(ALEX_INPUTS)
    assert res["methods"]["gradient_filter"]["layers"] == ["conv1", "conv2", "conv3"]
    assert result["machine"]["torch_threads"] == 1 and result["config"]["batch_size"] == B
    assert result["data"]["split"] == "train" and result["data"]["n_images_used"] <= N_IMAGES
    assert res["training"]["steps"] == 2
    for r in res["methods"].values():
        assert len(r["time"]["samples_s"]) == REPEATS


def test_printed_summary_shows_the_hand_counted_bytes(bench) -> None:
    _, stdout = bench
    rows = {line.split(" | ")[1]: line.split(" | ") for line in stdout.splitlines()
            if line.startswith("| alexnet |")}
    assert set(rows) == {"vanilla", "lance", "asi", "gradient_filter"}
    # 4 bytes x 4 images x 23296 input elements = 372736 B = 364 KiB, measured and analytic
    assert rows["vanilla"][3] == "364.00 KiB (364.00 KiB)"
    assert rows["vanilla"][4] == "1.0x"
    assert "| peak step mem. | ratio |" in stdout and "grad angle" in stdout


def test_vanilla_bytes_are_the_layer_inputs(bench) -> None:
    van = bench[0]["results"]["alexnet"]["methods"]["vanilla"]["memory"]
    assert van["selected"] == VANILLA_BYTES == 372736
    for name, shape in ALEX_INPUTS.items():
        assert van["per_layer_measured"][name] == 4 * B * math.prod(shape)
        assert van["per_layer_analytic"][name] == 4 * B * math.prod(shape)
    # the whole step also holds BN / ReLU / pool / dropout saves
    assert van["total"] > 2 * van["selected"]


def test_ratios_are_the_raw_figures_divided(bench) -> None:
    methods = bench[0]["results"]["alexnet"]["methods"]
    vanilla_time = statistics.median(methods["vanilla"]["time"]["samples_s"])
    for method, r in methods.items():
        convs_only = method == "gradient_filter"
        layers = [n for n in ALEX_INPUTS if not convs_only or n.startswith("conv")]
        hand_bytes = sum(4 * B * math.prod(ALEX_INPUTS[n]) for n in layers)
        hand_flops = sum(3 * 2 * ALEX_MACS[n] for n in layers)
        assert r["memory"]["vanilla_selected"] == hand_bytes
        assert r["memory"]["selected_ratio"] == pytest.approx(hand_bytes / r["memory"]["selected"])
        assert r["flops"]["vanilla_total"] == hand_flops
        assert r["flops"]["ratio"] == pytest.approx(r["flops"]["total"] / hand_flops)
        assert r["time"]["ratio"] == pytest.approx(
            statistics.median(r["time"]["samples_s"]) / vanilla_time)
    assert methods["lance"]["memory"]["selected_ratio"] > 1.0


def test_peak_step_memory_bounds(bench) -> None:
    methods = bench[0]["results"]["alexnet"]["methods"]
    # every weight gradient exists at the end of backward (no biases): conv 64x3x4x4, 128x64x3x3,
    # 256x128x2x2, fc 2048x1024, 2048x2048 float32
    grads = 4 * (64 * 3 * 16 + 128 * 64 * 9 + 256 * 128 * 4 + 2048 * 1024 + 2048 * 2048)
    for r in methods.values():
        assert r["memory"]["peak_step"] >= grads
    van = methods["vanilla"]["memory"]
    # everything saved coexists after the forward, less the batch (alive before the step)
    assert van["peak_step"] >= van["total"] - 4 * B * 3 * 32 * 32


def test_vanilla_flops_by_hand(bench) -> None:
    van = bench[0]["results"]["alexnet"]["methods"]["vanilla"]["flops"]
    assert van["total"] == sum(3 * 2 * m for m in ALEX_MACS.values())  # fwd + grad_in + grad_w
    for name, macs in ALEX_MACS.items():
        assert van["per_layer"][name]["forward"] == 2 * macs


def test_lance_bytes_are_core_plus_factors(bench) -> None:
    lance = bench[0]["results"]["alexnet"]["methods"]["lance"]
    mem = lance["memory"]
    shapes = {row["name"]: row["input_shape"] for row in lance["report"]}
    total = 0
    for name, shape in ALEX_INPUTS.items():
        full = (B,) + shape
        assert tuple(shapes[name]) == full
        ranks = lance["ranks"][name]
        assert ranks[0] is None  # lance leaves the batch mode alone by default
        assert all(r is not None and 1 <= r <= n for r, n in zip(ranks[1:], shape))
        core = math.prod(n if r is None else r for n, r in zip(full, ranks))
        factors = sum(n * r for n, r in zip(full, ranks) if r is not None)
        assert mem["per_layer_measured"][name] == 4 * (core + factors)
        total += 4 * (core + factors)
    # every stored factor owns a storage of exactly its n x r elements
    for storage in mem["factor_storage"].values():
        assert storage["held"] == storage["needed"]
    assert mem["selected"] == total < VANILLA_BYTES


def test_compressed_methods_report_an_angle_consistent_with_their_cosine(bench) -> None:
    methods = bench[0]["results"]["alexnet"]["methods"]
    for method in ("lance", "asi", "gradient_filter"):
        fid = methods[method]["fidelity"]
        assert -1.0 <= fid["overall"]["cosine"] < 1.0          # approximations, not exact
        assert math.isclose(math.degrees(math.acos(fid["overall"]["cosine"])), fid["overall"]["angle_deg"])
        assert set(fid["per_layer"]) == set(methods[method]["layers"])


def test_cosine_fidelity_on_hand_vectors() -> None:
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    fid = cosine_fidelity(a, b)
    assert fid["cosine"] == pytest.approx(1 / math.sqrt(2))
    assert fid["angle_deg"] == pytest.approx(45.0)
    assert fid["rel_error"] == pytest.approx(1 / math.sqrt(2))       # ||(0, -1)|| / ||(1, 1)||
    same = cosine_fidelity(b, b.clone())
    assert same == {"cosine": 1.0, "angle_deg": 0.0, "rel_error": 0.0}
    assert cosine_fidelity(-b, b)["angle_deg"] == pytest.approx(180.0)


def test_weight_grads_is_the_softmax_regression_gradient() -> None:
    """For logits = x W^T + b and mean cross-entropy, dL/dW = (softmax - onehot)^T x / B."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(5, 3)).double()
    model[0].train()
    model[1].eval()                 # a module in its own mode stays in it
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    grads = weight_grads(model, ["1"], x, y)
    p = F.softmax(x @ model[1].weight.t() + model[1].bias, dim=1)
    expected = (p - F.one_hot(y, 3).double()).t() @ x / 6                  # dropout is off
    torch.testing.assert_close(grads["1"], expected.flatten())
    assert model[0].training and not model[1].training
    assert model[1].weight.grad is None


def test_default_methods_are_each_registered_method_once(bench) -> None:
    args = cli.build_parser().parse_args(["bench"])
    bare = [m for m in args.methods if "+" not in m]
    assert bare == list(METHODS)                       # every registered method, in order
    # what the recorded run actually measured is what --methods asked for, vanilla first
    assert list(bench[0]["results"]["alexnet"]["methods"]) == ["vanilla", "lance", "asi",
                                                               "gradient_filter"]


def test_missing_data_names_the_files(tmp_path, capsys) -> None:
    status = cli.main(["bench", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                       "--models", "alexnet", "--methods", "vanilla"])
    assert status == 1
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "t10k-labels-idx1-ubyte" in err
    assert "--data-root" in err
    assert not (tmp_path / "o").exists()


def test_bad_method_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--methods", "lance,nope"])
    assert e.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_too_few_images_is_a_clear_error(tmp_path, capsys) -> None:
    root = fashion_fixture(tmp_path / "data", n=12)
    status = cli.main(["bench", "--data-root", str(root), "--out", str(tmp_path / "o"),
                       "--batch-size", "4", "--models", "alexnet", "--methods", "vanilla"])
    assert status == 1
    # 8 calibration batches + 1 measured + 1 training batch of 4 images
    assert "needs at least 40 images" in capsys.readouterr().err
