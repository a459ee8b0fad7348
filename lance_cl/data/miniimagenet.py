"""MiniImageNet (100 ImageNet classes, 600 images each) from a local image folder.

torchvision has no MiniImageNet and Avalanche 0.6.0 only reads it out of a full ILSVRC-2012
copy, so the images are read from ``<root>/miniimagenet/<wnid>/*.jpg`` (one folder per class,
e.g. ``n01532829/``; any image format PIL reads, any count per class; folders are classes).

- Classes: sorted folder names (wnids) -> labels 0..K-1.
- Images: converted to RGB and resized to 84x84 (PIL bilinear, antialiased) unless already so.
- Split, per class: files sorted by name, the last ``round(n / 6)`` go to test (at least one
  when n >= 2), the rest to train: 500 / 100 for the usual 600 images per class.
- The decoded uint8 tensors are cached in ``<root>/miniimagenet.RGB84.pt`` (reused while the
  file list is unchanged; about 1.3 GB for 60 000 images).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .errors import DatasetNotFoundError
from .image_folder import load_image_folder

__all__ = ["MINIIMAGENET_MEAN", "MINIIMAGENET_STD", "load_miniimagenet", "miniimagenet_split"]

# ImageNet statistics (TRGP's miniImageNet loader normalises with them), pixels in [0, 1]
MINIIMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
MINIIMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def miniimagenet_split(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(train_idx, test_idx) for labels ordered class by class, files sorted by name inside a
    class: the last ``round(n / 6)`` (>= 1 when n >= 2) samples of each class are test."""
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero(as_tuple=True)[0]
        n = len(idx)
        n_test = min(n - 1, max(1, int(round(n / 6)))) if n >= 2 else 0
        train.append(idx[: n - n_test])
        test.append(idx[n - n_test:])
    return torch.cat(train), torch.cat(test)


def load_miniimagenet(
    root: str | Path, *, size: int = 84, cache: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """(x_train, y_train, x_test, y_test, wnids): uint8 (N, 3, size, size), int64 labels
    indexing the sorted ``wnids``. Raises :class:`DatasetNotFoundError` when
    ``<root>/miniimagenet`` is missing or holds no class folder."""
    folder = Path(root).expanduser() / "miniimagenet"
    has_classes = folder.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())
    if not has_classes:
        raise DatasetNotFoundError(
            f"MiniImageNet not found under {Path(root).expanduser()}.\n"
            f"Expected: {folder}/<wnid>/*.jpg  (100 class folders, e.g. {folder}/n01532829/, "
            "600 images each; any image format and size, resized to 84x84).\n"
            "It cannot be downloaded automatically. Get the 100 miniImageNet classes (Vinyals et al. "
            "2016, the Ravi & Larochelle class lists) from an ImageNet copy (the ILSVRC-2012 train "
            "folders of those wnids) or a distributed miniImageNet archive, and arrange them one "
            "folder per wnid (docs/benchmarks.md). Set LANCE_CL_DATA or --data-root to change the "
            "data root."
        )
    d = load_image_folder(folder, size, mode="RGB", resample="bilinear", cache=cache)
    tr, te = miniimagenet_split(d.labels)
    return d.images[tr], d.labels[tr], d.images[te], d.labels[te], d.classes
