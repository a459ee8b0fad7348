"""The vision benchmarks built from tiny data sets in the real formats: tasks, classes per task,
input shapes, label ranges, the original class behind every sample, normalisation, padding,
the 5-Datasets order, the published defaults, the --quick variants and the download switch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from vision_fixtures import (
    write_cifar10,
    write_cifar100,
    write_miniimagenet,
    write_mnist_like,
    write_notmnist,
    write_svhn,
)

from lance_cl.benchmarks import available_benchmarks, get_benchmark
from lance_cl.benchmarks import vision
from lance_cl.data import DatasetNotFoundError, load_miniimagenet, load_notmnist
from lance_cl.models import AlexNet5, ReducedResNet18

GPM_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
GPM_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)



def _items(ds: Any) -> list[tuple[torch.Tensor, int, int]]:
    return [(x, int(y), int(t)) for x, y, t in (ds[i] for i in range(len(ds)))]


def _to_uint8(x: torch.Tensor, mean: Any, std: Any) -> np.ndarray:
    """Undo (x / 255 - mean) / std."""
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    v = ((x * s + m) * 255.0).round()
    assert float((v - (x * s + m) * 255.0).abs().max()) < 1e-2  # really an image of integers
    return v.clamp(0, 255).to(torch.uint8).numpy()


def _lookup(images: np.ndarray, labels: np.ndarray) -> dict[bytes, int]:
    return {images[i].tobytes(): int(labels[i]) for i in range(len(labels))}


def _check_stream(spec: Any, n_tasks: int, per_task: int, shape: tuple[int, ...]) -> list[list[Any]]:
    """Common structure; returns, per task, all (x, y) of train + validation + test."""
    assert spec.n_tasks == n_tasks and spec.classes_per_task == per_task and spec.input_shape == shape
    assert len(spec.train_stream) == len(spec.test_stream) == len(spec.val_datasets) == n_tasks
    everything = []
    for i in range(n_tasks):
        assert spec.train_stream[i].task_label == i and spec.test_stream[i].task_label == i
        train = _items(spec.train_stream[i].dataset) + _items(spec.val_datasets[i])
        test = _items(spec.test_stream[i].dataset)
        n_val = len(spec.val_datasets[i])
        assert n_val == max(1, round(spec.defaults["val_fraction"] * len(train)))
        for part in (train, test):
            assert {y for _, y, _ in part} == set(range(per_task))  # labels 0..k-1, all present
            assert {t for _, _, t in part} == {i}
            assert all(tuple(x.shape) == shape and x.dtype == torch.float32 for x, _, _ in part)
        everything.append([(x, y) for x, y, _ in train + test])
    return everything


def _forward(spec: Any, task: int) -> None:
    """One forward pass of a fresh model on a batch of the task: logits (2, classes_per_task)."""
    torch.manual_seed(0)
    model = spec.model_factory()
    batch = torch.stack([spec.test_stream[task].dataset[i][0] for i in range(2)])
    model.eval()
    with torch.no_grad():
        out = model(batch, task)
    assert out.shape == (2, spec.classes_per_task)


# -- published defaults ------------------------------------------------------------------------------

PUBLISHED = {
    # GPM 10-split CIFAR-100 (main_cifar100.py); its protocol reused for CIFAR-10
    "split_cifar100": dict(lr=0.01, batch_size=64, patience=6, lr_factor=2.0, lr_min=1e-5, epochs=200,
                           eps=0.97, eps_step=0.003, alpha=10.0, gpm_samples=125, val_fraction=0.05),
    "split_cifar10": dict(lr=0.01, batch_size=64, patience=6, lr_factor=2.0, lr_min=1e-5, epochs=200,
                          eps=0.97, eps_step=0.003, val_fraction=0.05),
    # GPM 5-Datasets (main_five_datasets.py)
    "five_datasets": dict(lr=0.1, batch_size=64, patience=5, lr_factor=3.0, lr_min=1e-3, epochs=100,
                          eps=0.965, eps_step=0.0, gpm_samples=100, val_fraction=0.05),
    # TRGP's 20-split miniImageNet script (GPM has none)
    "split_miniimagenet": dict(lr=0.1, batch_size=64, patience=5, lr_factor=3.0, lr_min=1e-3, epochs=100,
                               eps=0.985, eps_step=0.0, gpm_samples=100, val_fraction=0.02),
}


def test_registered_with_published_defaults() -> None:
    names = set(available_benchmarks())
    assert {"split_cifar10", "split_cifar100", "split_miniimagenet", "five_datasets", "split_mnist",
            "split_fashion_mnist", "split_digits"} <= names
    tables = {"split_cifar100": vision.CIFAR100_DEFAULTS, "split_cifar10": vision.CIFAR10_DEFAULTS,
              "five_datasets": vision.FIVE_DATASETS_DEFAULTS, "split_miniimagenet": vision.MINIIMAGENET_DEFAULTS}
    for name, expected in PUBLISHED.items():
        for key, value in expected.items():
            assert tables[name][key] == value, (name, key)
        assert tables[name]["eval_batch_size"] == 64  # GPM tests in batches of 64 (BN batch statistics)
    assert [n for n, _, _ in vision.FIVE_DATASETS] == ["cifar10", "mnist", "svhn", "fashion_mnist", "notmnist"]


# -- Split CIFAR-10 / CIFAR-100 -------------------------------------------------------------------------


@pytest.mark.parametrize("bench, writer, n_tasks, per_task", [
    ("split_cifar10", write_cifar10, 5, 2),
    ("split_cifar100", write_cifar100, 10, 10),
])
def test_split_cifar(tmp_path: Path, bench: str, writer: Any, n_tasks: int, per_task: int) -> None:
    wrote = writer(tmp_path)
    spec = get_benchmark(bench, data_root=tmp_path, seed=0)
    tasks = _check_stream(spec, n_tasks, per_task, (3, 32, 32))
    # natural class order, GPM normalisation: task i, label y <-> original class per_task * i + y
    originals = _lookup(np.concatenate([wrote["x_train"], wrote["x_test"]]),
                        np.concatenate([wrote["y_train"], wrote["y_test"]]))
    n_seen = 0
    for i, items in enumerate(tasks):
        for x, y in items:
            assert originals[_to_uint8(x, GPM_MEAN, GPM_STD).tobytes()] == per_task * i + y
            n_seen += 1
    assert n_seen == len(originals)  # every written image is in exactly one place
    assert {k: spec.defaults[k] for k in PUBLISHED[bench]} == PUBLISHED[bench]
    assert isinstance(spec.model_factory(), AlexNet5)
    _forward(spec, n_tasks - 1)


def test_split_cifar_quick(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_class_train=20, per_class_test=10)
    full = get_benchmark("split_cifar10", data_root=tmp_path)
    quick = get_benchmark("split_cifar10", data_root=tmp_path, quick=True)
    assert quick.quick and quick.defaults["epochs"] == 2 < full.defaults["epochs"]
    # 10 % of train (2 per class -> 4 per task), 20 % of test (2 per class -> 4 per task)
    assert [len(e.dataset) + len(v) for e, v in zip(quick.train_stream, quick.val_datasets)] == [4] * 5
    assert [len(e.dataset) for e in quick.test_stream] == [4] * 5
    _check_stream(quick, 5, 2, (3, 32, 32))


def test_cifar_missing_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        get_benchmark("split_cifar100", data_root=tmp_path)


def test_download_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--download / LANCE_CL_DOWNLOAD=1 reach torchvision (faked: nothing touches the network)."""
    import torchvision

    calls: list[str] = []

    def fake(kind: str, writer: Any):  # type: ignore[no-untyped-def]
        def make(root: str, train: bool = True, download: bool = False, **kw: Any) -> None:
            assert download
            calls.append(kind)
            writer(Path(root))
        return make

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake("cifar10", write_cifar10))
    monkeypatch.setattr(torchvision.datasets, "MNIST", fake("mnist", lambda r: write_mnist_like(r, "MNIST")))
    monkeypatch.delenv("LANCE_CL_DOWNLOAD", raising=False)
    with pytest.raises(DatasetNotFoundError):
        get_benchmark("split_cifar10", data_root=tmp_path / "a")
    assert calls == []
    monkeypatch.setenv("LANCE_CL_DOWNLOAD", "1")
    spec = get_benchmark("split_cifar10", data_root=tmp_path / "a")
    assert calls == ["cifar10"] and spec.n_tasks == 5
    monkeypatch.delenv("LANCE_CL_DOWNLOAD")
    spec = get_benchmark("split_mnist", data_root=tmp_path / "b", download=True)
    assert calls == ["cifar10", "mnist"] and spec.n_tasks == 5


# -- Split MiniImageNet ----------------------------------------------------------------------------------


def test_split_miniimagenet(tmp_path: Path) -> None:
    write_miniimagenet(tmp_path, n_classes=100, per_class=3, size=8)  # resized to 84x84 by the loader
    spec = get_benchmark("split_miniimagenet", data_root=tmp_path, seed=1)
    tasks = _check_stream(spec, 20, 5, (3, 84, 84))
    x_tr, y_tr, x_te, y_te, wnids = load_miniimagenet(tmp_path)  # from the cache written above
    assert x_tr.shape == (200, 3, 84, 84) and x_te.shape == (100, 3, 84, 84)
    originals = _lookup(torch.cat([x_tr, x_te]).numpy(), torch.cat([y_tr, y_te]).numpy())
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for i in (0, 7, 19):  # task i holds the sorted wnids 5i..5i+4
        for x, y in tasks[i]:
            assert originals[_to_uint8(x, mean, std).tobytes()] == 5 * i + y
    assert {k: spec.defaults[k] for k in PUBLISHED["split_miniimagenet"]} == PUBLISHED["split_miniimagenet"]
    model = spec.model_factory()
    assert isinstance(model, ReducedResNet18) and model.flat_features == 1440
    _forward(spec, 19)
    quick = get_benchmark("split_miniimagenet", data_root=tmp_path, quick=True)
    assert quick.defaults["epochs"] == 2 and quick.n_tasks == 20


def test_split_miniimagenet_needs_100_classes(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="miniimagenet"):
        get_benchmark("split_miniimagenet", data_root=tmp_path)
    write_miniimagenet(tmp_path, n_classes=4, per_class=2, size=8)
    with pytest.raises(ValueError, match="100 class folders"):
        get_benchmark("split_miniimagenet", data_root=tmp_path)


# -- 5-Datasets ------------------------------------------------------------------------------------------


def _write_five(root: Path) -> dict[str, dict]:
    return {
        "cifar10": write_cifar10(root),
        "mnist": write_mnist_like(root, "MNIST", seed=11),
        "svhn": write_svhn(root),
        "fashion_mnist": write_mnist_like(root, "FashionMNIST", seed=12),
        "notmnist": write_notmnist(root, per_class=3),
    }


def test_five_datasets(tmp_path: Path) -> None:
    wrote = _write_five(tmp_path)
    spec = get_benchmark("five_datasets", data_root=tmp_path, seed=0)
    tasks = _check_stream(spec, 5, 10, (3, 32, 32))
    assert {k: spec.defaults[k] for k in PUBLISHED["five_datasets"]} == PUBLISHED["five_datasets"]

    def both(d: dict) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate([d["x_train"], d["x_test"]]), np.concatenate([d["y_train"], d["y_test"]])

    # task 0: CIFAR-10 (GPM's CIFAR statistics), task 2: SVHN (label 10 -> 0)
    for task, name, mean, std in ((0, "cifar10", GPM_MEAN, GPM_STD),
                                  (2, "svhn", (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197))):
        originals = _lookup(*both(wrote[name]))
        assert len(tasks[task]) == len(originals)
        for x, y in tasks[task]:
            assert originals[_to_uint8(x, mean, std).tobytes()] == y
    # tasks 1 and 3: MNIST / Fashion-MNIST, zero-padded 28 -> 32 (border = normalised zero), grey x 3
    for task, name, mean, std in ((1, "mnist", 0.1, 0.2752), (3, "fashion_mnist", 0.2190, 0.3318)):
        originals = _lookup(*both(wrote[name]))
        assert len(tasks[task]) == len(originals)
        for x, y in tasks[task]:
            assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
            border = torch.ones(32, 32, dtype=torch.bool)
            border[2:30, 2:30] = False
            torch.testing.assert_close(x[:, border], torch.full((3, int(border.sum())), -mean / std))
            assert originals[_to_uint8(x[:1, 2:30, 2:30], mean, std)[0].tobytes()] == y
    # task 4: notMNIST resized to 32x32 (as GPM's converter did), grey x 3
    a_tr, b_tr, a_te, b_te = load_notmnist(tmp_path)
    originals = _lookup(torch.cat([a_tr, a_te])[:, 0].numpy(), torch.cat([b_tr, b_te]).numpy())
    assert len(tasks[4]) == len(originals) == 30
    for x, y in tasks[4]:
        assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
        assert originals[_to_uint8(x[:1], 0.4254, 0.4501)[0].tobytes()] == y
    assert isinstance(spec.model_factory(), ReducedResNet18)
    _forward(spec, 2)

    quick = get_benchmark("five_datasets", data_root=tmp_path, quick=True)
    assert quick.defaults["epochs"] == 2
    assert [len(e.dataset) for e in quick.test_stream] == [10] * 5  # one test image per class
    assert [e.task_label for e in quick.train_stream] == [0, 1, 2, 3, 4]


def test_five_datasets_missing_member_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        get_benchmark("five_datasets", data_root=tmp_path)
    write_cifar10(tmp_path)
    write_mnist_like(tmp_path, "MNIST")
    write_svhn(tmp_path)
    write_mnist_like(tmp_path, "FashionMNIST")
    with pytest.raises(DatasetNotFoundError, match="notMNIST"):
        get_benchmark("five_datasets", data_root=tmp_path)


def test_pad_to_32x32x3() -> None:
    x = torch.randint(1, 256, (2, 28, 28), dtype=torch.uint8)
    out = vision.pad_to_32x32x3(x)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out[:, 1, 2:30, 2:30], x) and int(out[:, :, :2].sum()) == 0 and int(out[:, :, :, 30:].sum()) == 0
    with pytest.raises(ValueError):
        vision.pad_to_32x32x3(torch.zeros(1, 40, 40, dtype=torch.uint8))


def test_run_parser_download_flag() -> None:
    import argparse

    from lance_cl.cl.commands import add_run_parser

    parser = argparse.ArgumentParser()
    add_run_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["run"]).download is False
    args = parser.parse_args(["run", "--benchmark", "five_datasets", "--download", "--quick"])
    assert args.download and args.quick and args.benchmark == "five_datasets"
