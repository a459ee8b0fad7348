"""IDX reading through the real on-disk layout, written byte by byte with struct."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lance_cl.data import DatasetNotFoundError, default_data_root, load_mnist_like, read_idx, to_32x32x3

# the real test split where the data root is ($LANCE_CL_DATA, else the checkout's ../shared/data)
SHARED_FASHION = default_data_root() / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz"


def _idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format: 0x00 0x00 0x08 ndim, big-endian dims, data."""
    assert arr.dtype == np.uint8
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes(order="C")


def _write_split(
    root: Path, folder: str, split: str, images: np.ndarray, labels: np.ndarray, compress: bool
) -> tuple[Path, Path]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, arr in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(arr)
        if compress:
            p = raw / f"{stem}.gz"
            p.write_bytes(gzip.compress(data))
        else:
            p = raw / stem
            p.write_bytes(data)
        paths.append(p)
    return paths[0], paths[1]


def _tiny(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n, dtype=np.uint8)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
@pytest.mark.parametrize("train", [True, False])
def test_roundtrip(tmp_path: Path, compress: bool, name: str, folder: str, train: bool) -> None:
    images, labels = _tiny(7, seed=int(compress) + 2 * int(train))
    _write_split(tmp_path, folder, "train" if train else "t10k", images, labels, compress)
    x, y = load_mnist_like(name, tmp_path, train=train)
    assert x.dtype == torch.uint8 and x.shape == (7, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (7,)
    np.testing.assert_array_equal(x.numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels.astype(np.int64))


def test_gzip_detected_by_content(tmp_path: Path) -> None:
    # a gzip stream stored under the plain name still decodes
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(gzip.compress(_idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(p), arr)


def test_read_idx_big_endian_int32(tmp_path: Path) -> None:
    vals = [1, -2, 70000, 2**31 - 1]
    p = tmp_path / "ints"
    p.write_bytes(struct.pack(">BBBBI", 0, 0, 0x0C, 1, 4) + struct.pack(">4i", *vals))
    out = read_idx(p)
    assert out.tolist() == vals and out.dtype.isnative


def test_missing_files_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist_like("fashion_mnist", tmp_path, train=True)
    msg = str(info.value)
    raw = tmp_path / "FashionMNIST" / "raw"
    assert str(raw / "train-images-idx3-ubyte") in msg
    assert str(raw / "train-labels-idx1-ubyte") in msg
    assert "http" in msg
    assert isinstance(info.value, FileNotFoundError)

    # only the labels missing: both still named, the missing one marked
    images, labels = _tiny(3, seed=5)
    img, lbl = _write_split(tmp_path, "MNIST", "t10k", images, labels, compress=True)
    lbl.unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist_like("mnist", tmp_path, train=False)
    msg = str(info.value)
    assert str(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte") in msg
    assert "MISSING" in msg and "found" in msg


def test_corrupt_magic_raises(tmp_path: Path) -> None:
    images, labels = _tiny(4, seed=1)
    img, _ = _write_split(tmp_path, "MNIST", "train", images, labels, compress=False)
    data = bytearray(img.read_bytes())
    data[0] = 0x12  # first two magic bytes must be zero
    img.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="magic"):
        load_mnist_like("mnist", tmp_path, train=True)
    data[0] = 0
    data[2] = 0x42  # unknown type code
    img.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="magic"):
        load_mnist_like("mnist", tmp_path, train=True)


def test_truncated_and_mismatched_raise(tmp_path: Path) -> None:
    images, labels = _tiny(4, seed=2)
    img, lbl = _write_split(tmp_path, "MNIST", "train", images, labels, compress=False)
    img.write_bytes(img.read_bytes()[:-5])
    with pytest.raises(ValueError, match="data bytes"):
        load_mnist_like("mnist", tmp_path, train=True)
    _write_split(tmp_path, "MNIST", "train", images, labels[:3], compress=False)
    with pytest.raises(ValueError, match="labels"):
        load_mnist_like("mnist", tmp_path, train=True)
    img.write_bytes(gzip.compress(_idx_bytes(images))[:40])  # broken gzip stream
    with pytest.raises(ValueError):
        load_mnist_like("mnist", tmp_path, train=True)


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_mnist_like("cifar10", tmp_path, train=True)


def test_to_32x32x3_values() -> None:
    images = torch.tensor(np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8))
    mean, std = 0.25, 0.5
    out = to_32x32x3(images, mean=mean, std=std)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    border_value = (0.0 - mean) / std
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(out[:, :, border] == border_value)
    # interior: the normalised pixels, identical in the three channels
    expected = (images.double() / 255.0 - mean) / std
    for c in range(3):
        torch.testing.assert_close(out[:, c, 2:30, 2:30].double(), expected, rtol=0, atol=1e-6)
    # per-channel statistics and a (N, 1, H, W) input
    out3 = to_32x32x3(images.unsqueeze(1), mean=(0.0, 0.5, 1.0), std=(1.0, 1.0, 2.0))
    assert out3.shape == (3, 3, 32, 32)
    assert out3[0, :, 0, 0].tolist() == [0.0, -0.5, -0.5]


def test_to_32x32x3_rejects_float() -> None:
    with pytest.raises(ValueError):
        to_32x32x3(torch.zeros(2, 28, 28))


def test_default_data_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LANCE_CL_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("LANCE_CL_DATA")
    assert isinstance(default_data_root(), Path)


@pytest.mark.skipif(not SHARED_FASHION.is_file(), reason="no Fashion-MNIST under the data root: set LANCE_CL_DATA")
def test_real_fashion_mnist_test_split() -> None:
    x, y = load_mnist_like("fashion_mnist", SHARED_FASHION.parents[2], train=False)
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (10000,)
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(y).tolist() == [1000] * 10  # the test split is balanced
