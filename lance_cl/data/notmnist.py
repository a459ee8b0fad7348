"""notMNIST (letters A-J in many fonts) from a local image folder; neither torchvision nor
Avalanche ships it, and there is nothing to download automatically.

Accepted layouts under ``<root>/notMNIST/`` (28x28 grey PNGs, as in ``notMNIST_small.tar.gz``):

1. ``<root>/notMNIST/train/<A..J>/*.png`` and ``<root>/notMNIST/test/<A..J>/*.png``: used as given;
2. ``<root>/notMNIST/<A..J>/*.png`` (the unpacked ``notMNIST_small/`` folder, renamed or linked):
   split per class into train / test with a fixed seeded permutation of the sorted file names
   (``test_fraction`` = 0.1, seed 42: GPM's converter made a 90/10 split with
   ``random_state=42``, but its file order, hence its exact split, cannot be reproduced).

Images are resized to ``size`` x ``size`` (32 by default, with the Lanczos filter, as GPM's
converter did with PIL's ANTIALIAS) and kept grey (N, 1, size, size) uint8. The small
archive has a couple of unreadable PNGs: they are skipped with a warning.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .errors import DatasetNotFoundError
from .image_folder import load_image_folder

__all__ = ["NOTMNIST_CLASSES", "NOTMNIST_MEAN", "NOTMNIST_STD", "load_notmnist", "split_per_class"]

NOTMNIST_CLASSES: list[str] = list("ABCDEFGHIJ")
# GPM's 5-Datasets statistics for notMNIST (pixels in [0, 1])
NOTMNIST_MEAN: float = 0.4254
NOTMNIST_STD: float = 0.4501
NOTMNIST_SOURCES = (
    "notMNIST_small.tar.gz by Yaroslav Bulatov (http://yaroslavvb.blogspot.com/2011/09/notmnist-dataset.html; "
    "file http://yaroslavvb.com/upload/notMNIST/notMNIST_small.tar.gz)"
)


def split_per_class(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Sorted (train_idx, test_idx): per class, ``round(test_fraction * n)`` (at least 1 when
    the class has 2+ samples) indices drawn by a seeded permutation go to test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero(as_tuple=True)[0]
        n = len(idx)
        n_test = min(n - 1, max(1, int(round(test_fraction * n)))) if n >= 2 else 0
        perm = idx[torch.randperm(n, generator=gen)]
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


def _check_classes(folder: Path, classes: list[str]) -> None:
    if classes != NOTMNIST_CLASSES:
        raise ValueError(f"{folder}: expected the class folders A..J, found {classes}")


def load_notmnist(
    root: str | Path,
    *,
    size: int = 32,
    test_fraction: float = 0.1,
    seed: int = 42,
    cache: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): uint8 (N, 1, size, size) and int64 labels 0..9 (A..J).

    Raises :class:`DatasetNotFoundError` when ``<root>/notMNIST`` holds neither layout.
    """
    base = Path(root).expanduser() / "notMNIST"
    kw = dict(mode="L", resample="lanczos", cache=cache, skip_unreadable=True)
    if (base / "train").is_dir() and (base / "test").is_dir():
        parts = []
        for split in ("train", "test"):
            d = load_image_folder(base / split, size, **kw)
            _check_classes(base / split, d.classes)
            parts.append((d.images, d.labels))
        (x_tr, y_tr), (x_te, y_te) = parts
        return x_tr, y_tr, x_te, y_te
    if base.is_dir() and all((base / c).is_dir() for c in NOTMNIST_CLASSES):
        d = load_image_folder(base, size, **kw)
        _check_classes(base, d.classes)
        tr, te = split_per_class(d.labels, test_fraction, seed)
        return d.images[tr], d.labels[tr], d.images[te], d.labels[te]
    raise DatasetNotFoundError(
        f"notMNIST not found under {Path(root).expanduser()}.\n"
        "Expected one of:\n"
        f"  {base}/A ... {base}/J  (class folders of 28x28 PNGs; split 90/10 here, seed {seed})\n"
        f"  {base}/train/A..J and {base}/test/A..J  (your own split)\n"
        f"Get {NOTMNIST_SOURCES}, unpack it and rename (or link) notMNIST_small/ to {base}. "
        "It cannot be downloaded automatically (not in torchvision). "
        "Set LANCE_CL_DATA or --data-root to change the data root."
    )
