"""A tiny FashionMNIST train split in the real idx.gz format, for the `lance-cl bench` tests."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx_gz(path: Path, arr: np.ndarray) -> None:
    """IDX: 0x00 0x00, type 0x08 (uint8), ndim, big-endian uint32 dims, row-major data; gzipped."""
    assert arr.dtype == np.uint8
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.tobytes(order="C")))


def fashion_fixture(root: Path, n: int = 48, seed: int = 0) -> Path:
    """``n`` 28x28 images with some structure (blobs, not white noise) under root/FashionMNIST/raw."""
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
    write_idx_gz(raw / "train-images-idx3-ubyte.gz", images)
    write_idx_gz(raw / "train-labels-idx1-ubyte.gz", labels)
    return root
