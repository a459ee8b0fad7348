"""Tiny data sets written in the real on-disk formats (no network), shared by the vision tests.

Every writer returns what it wrote, so tests compare the loaders' output with it exactly:
images as uint8 (N, C, H, W) numpy arrays and labels as int64 arrays (the labels a correct
loader must return, e.g. SVHN's 10 already mapped to 0).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def _images(rng: np.random.Generator, n: int, c: int, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def _labels(n_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Every class ``per_class`` times, shuffled (so loaders cannot rely on sorted labels)."""
    return rng.permutation(np.repeat(np.arange(n_classes), per_class)).astype(np.int64)


# -- CIFAR pickles ------------------------------------------------------------------------------------


def _cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: bytes, extra: dict) -> None:
    batch = {
        b"batch_label": b"fixture batch",
        label_key: [int(v) for v in labels],  # the real files hold python lists
        b"data": images.reshape(len(images), -1),  # (N, 3072): R plane, G plane, B plane
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
        **extra,
    }
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)


def write_cifar10(root: Path, per_class_train: int = 2, per_class_test: int = 1, seed: int = 0) -> dict:
    """``<root>/cifar-10-batches-py/data_batch_1..5`` (uneven sizes) and ``test_batch``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    y_tr, y_te = _labels(10, per_class_train, rng), _labels(10, per_class_test, rng)
    x_tr, x_te = _images(rng, len(y_tr), 3, 32, 32), _images(rng, len(y_te), 3, 32, 32)
    cuts = np.array_split(np.arange(len(y_tr)), 5)
    for i, idx in enumerate(cuts, start=1):
        _cifar_batch(folder / f"data_batch_{i}", x_tr[idx], y_tr[idx], b"labels", {})
    _cifar_batch(folder / "test_batch", x_te, y_te, b"labels", {})
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}


def write_cifar100(root: Path, per_class_train: int = 2, per_class_test: int = 1, seed: int = 1) -> dict:
    """``<root>/cifar-100-python/train`` and ``test`` with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        y = _labels(100, per_class, rng)
        x = _images(rng, len(y), 3, 32, 32)
        coarse = [int(v) // 5 for v in y]
        _cifar_batch(folder / split, x, y, b"fine_labels", {b"coarse_labels": coarse})
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return out


# -- MNIST idx.gz -------------------------------------------------------------------------------------


def _idx(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist_like(root: Path, folder: str, per_class_train: int = 2, per_class_test: int = 1,
                     seed: int = 2) -> dict:
    """``<root>/<MNIST|FashionMNIST>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, tag, per_class in (("train", "train", per_class_train), ("test", "t10k", per_class_test)):
        y = _labels(10, per_class, rng)
        x = rng.integers(0, 256, size=(len(y), 28, 28), dtype=np.uint8)
        (raw / f"{tag}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(x)))
        (raw / f"{tag}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(y)))
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return out


# -- SVHN .mat ----------------------------------------------------------------------------------------


def write_svhn(root: Path, per_class_train: int = 2, per_class_test: int = 1, seed: int = 3) -> dict:
    """``<root>/svhn/{train,test}_32x32.mat``: X uint8 (32, 32, 3, N), y uint8 (N, 1), 10 = digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder = root / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        y = _labels(10, per_class, rng)
        x = _images(rng, len(y), 3, 32, 32)  # (N, C, H, W)
        y_file = np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)
        savemat(str(folder / f"{split}_32x32.mat"), {"X": np.ascontiguousarray(x.transpose(2, 3, 1, 0)), "y": y_file})
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return out


# -- image folders ------------------------------------------------------------------------------------


def write_image_folder(folder: Path, classes: list[str], per_class: int, size: int, mode: str = "RGB",
                       ext: str = ".png", seed: int = 4) -> dict:
    """``<folder>/<class>/img_###<ext>``; returns the images (N, C, size, size) in sorted order
    (class by class, file names sorted) with their labels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    c = 3 if mode == "RGB" else 1
    xs, ys = [], []
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            x = _images(rng, 1, c, size, size)[0]
            arr = x.transpose(1, 2, 0) if c == 3 else x[0]
            Image.fromarray(arr).save(folder / name / f"img_{i:03d}{ext}")
            xs.append(x)
            ys.append(label)
    return {"x": np.stack(xs), "y": np.array(ys, dtype=np.int64)}


def write_notmnist(root: Path, per_class: int = 3, seed: int = 5) -> dict:
    """``<root>/notMNIST/<A..J>/*.png``, 28x28 grey."""
    return write_image_folder(root / "notMNIST", list("ABCDEFGHIJ"), per_class, 28, mode="L", seed=seed)


def write_miniimagenet(root: Path, n_classes: int = 100, per_class: int = 3, size: int = 84, seed: int = 6) -> dict:
    """``<root>/miniimagenet/<wnid>/*.png`` with fake wnids n00000000, n00000001, ..."""
    wnids = [f"n{i:08d}" for i in range(n_classes)]
    out = write_image_folder(root / "miniimagenet", wnids, per_class, size, mode="RGB", seed=seed)
    out["wnids"] = wnids
    return out
