"""Benchmark registry: split_digits checked against scikit-learn's data, MNIST-like loaders on tiny
idx files written here, the missing-file error and registration."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lance_cl.benchmarks import available_benchmarks, get_benchmark, register_benchmark
from lance_cl.data import DatasetNotFoundError
from lance_cl.models import SmallCNN


def _items(ds):  # type: ignore[no-untyped-def]
    return [ds[i] for i in range(len(ds))]


def test_split_digits_against_sklearn() -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    labels_of: dict[bytes, set[int]] = {}
    for img, lab in zip(d.images, d.target):
        labels_of.setdefault((img / 16.0).astype(np.float32).tobytes(), set()).add(int(lab))

    spec = get_benchmark("split_digits", seed=0)
    assert (spec.n_tasks, spec.classes_per_task, spec.input_shape) == (5, 2, (1, 8, 8))
    n_train = [len(e.dataset) for e in spec.train_stream]
    n_val = [len(v) for v in spec.val_datasets]
    n_test = [len(e.dataset) for e in spec.test_stream]
    # 1797 images, 20 % test: ceil(0.2 * 1797) = 360, train 1437
    assert sum(n_test) == 360 and sum(n_train) + sum(n_val) == 1437
    assert all(v == round(0.05 * (t + v)) for t, v in zip(n_train, n_val))
    for i in range(5):
        for ds in (spec.train_stream[i].dataset, spec.val_datasets[i], spec.test_stream[i].dataset):
            for x, y, t in _items(ds):
                assert x.shape == (1, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
                assert t == i and y in (0, 1)
                # task i holds the original classes 2i (label 0) and 2i+1 (label 1)
                assert 2 * i + int(y) in labels_of[x.numpy().astype(np.float32).tobytes()]
    assert spec.defaults["lr"] > 0 and spec.defaults["epochs"] >= 1
    torch.manual_seed(0)
    model = spec.model_factory()
    assert isinstance(model, SmallCNN) and len(model.heads) == 5
    # the validation split depends on the seed, the test split does not
    other = get_benchmark("split_digits", seed=1)
    assert [len(e.dataset) for e in other.test_stream] == n_test
    v0 = {x.numpy().tobytes() for x, _, _ in _items(spec.val_datasets[0])}
    v1 = {x.numpy().tobytes() for x, _, _ in _items(other.val_datasets[0])}
    assert v0 != v1
    assert get_benchmark("split_digits", quick=True).defaults["epochs"] < spec.defaults["epochs"]


def _idx(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _fake_mnist(root: Path, folder: str, per_class_train: int, per_class_test: int) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), n)
        images = rng.integers(0, 256, size=(len(labels), 28, 28))
        images[:, 0, 0] = labels * 20  # a pixel that identifies the class
        (raw / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (raw / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))


@pytest.mark.parametrize("name, folder, mean, std", [
    ("split_mnist", "MNIST", 0.1307, 0.3081),
    ("split_fashion_mnist", "FashionMNIST", 0.2860, 0.3530),
])
def test_mnist_like_from_idx_files(tmp_path: Path, name: str, folder: str, mean: float, std: float) -> None:
    _fake_mnist(tmp_path, folder, per_class_train=20, per_class_test=4)
    spec = get_benchmark(name, data_root=tmp_path)
    assert [len(e.dataset) + len(v) for e, v in zip(spec.train_stream, spec.val_datasets)] == [40] * 5
    assert [len(v) for v in spec.val_datasets] == [2] * 5  # 5 % of 40
    assert [len(e.dataset) for e in spec.test_stream] == [8] * 5
    for i, exp in enumerate(spec.test_stream):
        for x, y, t in _items(exp.dataset):
            assert x.shape == (1, 28, 28) and t == i
            # pixel (0, 0) was 20 * original class; normalised with the data set's mean / std
            expected = (20.0 * (2 * i + int(y)) / 255.0 - mean) / std
            assert float(x[0, 0, 0]) == pytest.approx(expected, abs=1e-5)
    assert spec.defaults["lr"] == 0.01 and spec.defaults["patience"] == 6
    model = spec.model_factory()
    assert model(torch.zeros(3, 1, 28, 28), 4).shape == (3, 2)
    quick = get_benchmark(name, data_root=tmp_path, quick=True)
    # 20 % of each class: 4 train images per class -> 8 per task (1 of them validation)
    assert [len(e.dataset) + len(v) for e, v in zip(quick.train_stream, quick.val_datasets)] == [8] * 5


def test_missing_files_and_registry(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="MNIST"):
        get_benchmark("split_mnist", data_root=tmp_path)
    with pytest.raises(KeyError, match="split_digits"):
        get_benchmark("no_such_benchmark")
    assert {"split_digits", "split_mnist", "split_fashion_mnist"} <= set(available_benchmarks())
    with pytest.raises(ValueError):
        register_benchmark("split_digits")(lambda **kw: None)
