"""SVHN (cropped digits, "format 2") from the original MATLAB files.

On-disk layout: ``<root>/svhn/train_32x32.mat`` and ``<root>/svhn/test_32x32.mat`` (what
``torchvision.datasets.SVHN('<root>/svhn', split=..., download=True)`` writes). Each file holds
``X``: uint8 (32, 32, 3, N) indexed (row, column, channel, sample) and ``y``: (N, 1) with the
digits 1..9 and 10 for the digit 0 (mapped to label 0 here, as torchvision does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DatasetNotFoundError

__all__ = ["SVHN_MEAN", "SVHN_STD", "SVHN_URL", "load_svhn", "svhn_expected_file"]

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
# GPM's 5-Datasets statistics for SVHN (pixels in [0, 1])
SVHN_MEAN: tuple[float, float, float] = (0.4377, 0.4438, 0.4728)
SVHN_STD: tuple[float, float, float] = (0.198, 0.201, 0.197)


def svhn_expected_file(root: str | Path, train: bool) -> Path:
    """``<root>/svhn/train_32x32.mat`` or ``<root>/svhn/test_32x32.mat``."""
    return Path(root).expanduser() / "svhn" / f"{'train' if train else 'test'}_32x32.mat"


def load_svhn(root: str | Path, train: bool, *, download: bool = False) -> tuple[Tensor, Tensor]:
    """Load one split of SVHN: uint8 images (N, 3, 32, 32) and int64 labels 0..9 (N,).

    Missing file: with ``download`` torchvision fetches it (network), else
    :class:`DatasetNotFoundError`. A corrupt file raises ValueError.
    """
    from scipy.io import loadmat

    path = svhn_expected_file(root, train)
    split = "train" if train else "test"
    failure = ""
    if not path.is_file() and download:
        import torchvision

        try:
            torchvision.datasets.SVHN(str(path.parent), split=split, download=True)
        except Exception as e:  # offline, HTTP error...
            failure = f"\nThe download failed: {type(e).__name__}: {e}"
    if not path.is_file():
        raise DatasetNotFoundError(
            f"svhn ({split} split) not found under {Path(root).expanduser()}.\n"
            f"Expected file:\n  {path}  (MISSING)\n"
            f"Get {split}_32x32.mat from {SVHN_URL} (\"Format 2: cropped digits\") into "
            f"{path.parent}, or, when online, let torchvision download it: "
            f"`lance-cl run --download --data-root {Path(root).expanduser()} ...` or "
            f"torchvision.datasets.SVHN('{path.parent}', split='{split}', download=True). "
            "Set LANCE_CL_DATA to change the default data root." + failure
        )
    try:
        mat = loadmat(str(path), variable_names=["X", "y"])
    except Exception as e:  # scipy raises several types (ValueError, MatReadError, TypeError...)
        raise ValueError(f"{path}: not a readable SVHN .mat file ({type(e).__name__}: {e})") from e
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: SVHN .mat file lacks 'X' or 'y' (has {sorted(k for k in mat if not k.startswith('__'))})")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise ValueError(f"{path}: expected X uint8 of shape (32, 32, 3, N), got {x.dtype} {x.shape}")
    y = y.reshape(-1).astype(np.int64)
    if y.shape[0] != x.shape[3]:
        raise ValueError(f"{path}: {x.shape[3]} images but {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() > 10):
        raise ValueError(f"{path}: labels outside 0..10")
    y[y == 10] = 0
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))  # (N, C, H, W)
    return images, torch.from_numpy(y)
