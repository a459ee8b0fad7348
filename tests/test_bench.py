"""`lance-cl bench` end to end on a tiny FashionMNIST written in the real idx.gz format.

The numbers are checked against truths computed here by hand from the layer shapes, not against
the library's own accounting: vanilla's saved bytes are the layer inputs, lance's are its cores
plus factors, vanilla's FLOPs are the textbook 3 x 2 x MACs, and vanilla matches itself.
"""
from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from lance_cl import cli

B = 4          # batch size of the tiny run
N_IMAGES = 48  # 8 calibration batches + the measured batch + training images


def _write_idx_gz(path: Path, arr: np.ndarray) -> None:
    """IDX: 0x00 0x00, type 0x08 (uint8), ndim, big-endian uint32 dims, row-major data; gzipped."""
    assert arr.dtype == np.uint8
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.tobytes(order="C")))


def _fashion_fixture(root: Path, n: int = N_IMAGES, seed: int = 0) -> Path:
    """Tiny FashionMNIST train split with some structure (blobs, not white noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = np.empty((n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        cy, cx = 8 + 1.2 * c, 20 - 1.2 * c
        blob = 255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (3 + c / 3) ** 2))
        images[i] = np.clip(blob + rng.normal(0, 20, size=(28, 28)), 0, 255).astype(np.uint8)
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx_gz(raw / "train-images-idx3-ubyte.gz", images)
    _write_idx_gz(raw / "train-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, str]:
    base = tmp_path_factory.mktemp("bench")
    root = _fashion_fixture(base / "data")
    out = base / "out"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        status = cli.main(["bench", "--data-root", str(root), "--out", str(out), "--batch-size", str(B),
                           "--repeats", "2", "--warmup", "0", "--train-steps", "2", "--threads", "1",
                           "--models", "alexnet", "--methods", "vanilla,lance,asi,gradient_filter"])
    assert status == 0
    assert (out / "bench.md").read_text().startswith("Machine:")
    return json.loads((out / "bench.json").read_text()), buf.getvalue()


# AlexNet-5 inputs of the compressed layers for 32x32x3 images (GPM geometry)
ALEX_INPUTS = {"conv1": (3, 32, 32), "conv2": (64, 14, 14), "conv3": (128, 6, 6),
               "fc1": (1024,), "fc2": (2048,)}


def test_layers_and_printed_table(bench) -> None:
    result, stdout = bench
    res = result["results"]["alexnet"]
    assert res["compressed_layers"] == list(ALEX_INPUTS)
    assert res["methods"]["gradient_filter"]["layers"] == ["conv1", "conv2", "conv3"]
    assert "| alexnet | lance |" in stdout and "grad angle" in stdout
    assert result["machine"]["torch_threads"] == 1 and result["config"]["batch_size"] == B
    assert result["data"]["split"] == "train" and result["data"]["n_images_used"] <= N_IMAGES


def test_vanilla_is_its_own_reference(bench) -> None:
    van = bench[0]["results"]["alexnet"]["methods"]["vanilla"]
    assert van["memory"]["selected_ratio"] == 1.0
    assert van["memory"]["total_ratio"] == 1.0
    assert van["time"]["ratio"] == 1.0
    assert van["flops"]["ratio"] == 1.0
    # an independent second plain-autograd pass on the same weights and batch
    assert van["fidelity"]["overall"]["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert van["fidelity"]["overall"]["angle_deg"] == pytest.approx(0.0, abs=0.01)
    for fid in van["fidelity"]["per_layer"].values():
        assert fid["cosine"] == pytest.approx(1.0, abs=1e-9)


def test_vanilla_bytes_are_the_layer_inputs(bench) -> None:
    van = bench[0]["results"]["alexnet"]["methods"]["vanilla"]["memory"]
    expected = sum(4 * B * math.prod(shape) for shape in ALEX_INPUTS.values())
    assert van["selected"] == expected
    for name, shape in ALEX_INPUTS.items():
        assert van["per_layer_measured"][name] == 4 * B * math.prod(shape)
    # the whole step also holds BN / ReLU / pool / dropout saves
    assert van["total"] > 2 * van["selected"]


def test_peak_step_memory_bounds(bench) -> None:
    result, stdout = bench
    methods = result["results"]["alexnet"]["methods"]
    # every weight gradient exists at the end of backward (no biases): conv 64x3x4x4, 128x64x3x3,
    # 256x128x2x2, fc 2048x1024, 2048x2048 float32
    grads = 4 * (64 * 3 * 16 + 128 * 64 * 9 + 256 * 128 * 4 + 2048 * 1024 + 2048 * 2048)
    for r in methods.values():
        assert r["memory"]["peak_step"] >= grads
    van = methods["vanilla"]["memory"]
    # everything saved coexists after the forward, less the batch (alive before the step)
    assert van["peak_step"] >= van["total"] - 4 * B * 3 * 32 * 32
    assert van["peak_step_ratio"] == 1.0 and van["vanilla_peak_step"] == van["peak_step"]
    assert "| peak step mem. | ratio |" in stdout


def test_vanilla_flops_by_hand(bench) -> None:
    macs = {
        "conv1": B * 64 * 29 * 29 * 3 * 4 * 4,
        "conv2": B * 128 * 12 * 12 * 64 * 3 * 3,
        "conv3": B * 256 * 5 * 5 * 128 * 2 * 2,
        "fc1": B * 1024 * 2048,
        "fc2": B * 2048 * 2048,
    }
    van = bench[0]["results"]["alexnet"]["methods"]["vanilla"]["flops"]
    assert van["total"] == sum(3 * 2 * m for m in macs.values())  # forward + grad_input + grad_weight


def _core_plus_factors(shape, ranks) -> int:
    core = math.prod(n if r is None else r for n, r in zip(shape, ranks))
    return 4 * (core + sum(n * r for n, r in zip(shape, ranks) if r is not None))


def test_lance_bytes_are_core_plus_factors(bench) -> None:
    res = bench[0]["results"]["alexnet"]
    lance = res["methods"]["lance"]
    mem = lance["memory"]
    shapes = {row["name"]: row["input_shape"] for row in lance["report"]}
    expected = 0
    for name, shape in ALEX_INPUTS.items():
        assert tuple(shapes[name]) == (B,) + shape
        ranks = lance["ranks"][name]
        assert ranks[0] is None  # lance leaves the batch mode alone by default
        assert all(r is not None and 1 <= r <= n for r, n in zip(ranks[1:], shape))
        expected += _core_plus_factors((B,) + shape, ranks)
    # factors that are views of a larger eigenvector matrix keep all of it alive (SPEC 9)
    excess = sum(s["held"] - s["needed"] for s in mem["factor_storage"].values())
    assert mem["selected"] == expected + excess
    assert mem["selected_ratio"] == pytest.approx(
        res["methods"]["vanilla"]["memory"]["selected"] / mem["selected"])
    if excess:
        pytest.xfail(f"core: stored lance factors keep {excess} bytes of eigenvector storage alive "
                     "beyond their n x r elements (rank-1 column of a column-major eigh result)")
    assert mem["selected"] == expected
    assert mem["selected"] < res["methods"]["vanilla"]["memory"]["selected"]


def test_fidelity_of_compressed_methods_is_a_valid_angle(bench) -> None:
    methods = bench[0]["results"]["alexnet"]["methods"]
    for method in ("lance", "asi", "gradient_filter"):
        fid = methods[method]["fidelity"]
        assert -1.0 <= fid["overall"]["cosine"] <= 1.0
        assert math.isclose(math.degrees(math.acos(fid["overall"]["cosine"])), fid["overall"]["angle_deg"])
        assert set(fid["per_layer"]) == set(methods[method]["layers"])
        assert len(methods[method]["time"]["samples_s"]) == 2


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
    root = _fashion_fixture(tmp_path / "data", n=12)
    status = cli.main(["bench", "--data-root", str(root), "--out", str(tmp_path / "o"),
                       "--batch-size", "4", "--models", "alexnet", "--methods", "vanilla"])
    assert status == 1
    assert "needs at least 40 images" in capsys.readouterr().err
