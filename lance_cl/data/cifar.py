"""CIFAR-10 and CIFAR-100 from the original "python version" pickle batches.

On-disk layout (what ``torchvision.datasets.CIFAR10/100(root, download=True)`` leaves, and what
the official archives unpack to):

- ``<root>/cifar-10-batches-py/data_batch_1`` ... ``data_batch_5`` (train), ``test_batch``;
- ``<root>/cifar-100-python/train``, ``<root>/cifar-100-python/test`` (fine labels are used).

Each batch is a pickled dict (bytes keys) with ``b"data"``: uint8 (N, 3072), rows holding the
red, green then blue 32x32 planes in row-major order, and ``b"labels"`` (CIFAR-10) or
``b"fine_labels"`` (CIFAR-100): N ints.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DatasetNotFoundError

__all__ = [
    "CIFAR",
    "GPM_CIFAR_MEAN",
    "GPM_CIFAR_STD",
    "cifar_expected_files",
    "load_cifar",
    "read_cifar_batch",
]

# GPM's CIFAR-100 statistics (also used for CIFAR-10 in GPM's 5-Datasets), pixels in [0, 1]
GPM_CIFAR_MEAN: tuple[float, float, float] = (125.3 / 255, 123.0 / 255, 113.9 / 255)
GPM_CIFAR_STD: tuple[float, float, float] = (63.0 / 255, 62.1 / 255, 66.7 / 255)

# canonical name -> folder, train files, test files, label key, number of classes, URL, torchvision class
CIFAR: dict[str, dict] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": b"labels",
        "n_classes": 10,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "torchvision": "CIFAR10",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": b"fine_labels",
        "n_classes": 100,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "torchvision": "CIFAR100",
    },
}


def _canonical(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in CIFAR:
        raise ValueError(f"unknown CIFAR data set {name!r}; expected 'cifar10' or 'cifar100'")
    return key


def cifar_expected_files(name: str, root: str | Path, train: bool) -> list[Path]:
    """The batch files of one split of ``name`` ("cifar10" / "cifar100") under ``root``."""
    info = CIFAR[_canonical(name)]
    folder = Path(root).expanduser() / info["folder"]
    return [folder / f for f in info["train" if train else "test"]]


def read_cifar_batch(path: str | Path, label_key: bytes = b"labels") -> tuple[Tensor, Tensor]:
    """Read one pickled CIFAR batch: uint8 images (N, 3, 32, 32) and int64 labels (N,).

    Raises ValueError when the file does not unpickle, lacks a key or has the wrong shapes.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as e:
        raise ValueError(f"{path}: not a readable CIFAR pickle batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    missing = [k for k in (b"data", label_key) if k not in batch]
    if missing:
        raise ValueError(
            f"{path}: CIFAR batch lacks key(s) {missing}; has {sorted(batch)}"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: expected b'data' uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: expected {data.shape[0]} integer labels under {label_key!r}, "
            f"got {labels.dtype} {labels.shape}"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def _missing_error(key: str, root: Path, wanted: list[Path], train: bool) -> DatasetNotFoundError:
    info = CIFAR[key]
    lines = [f"  {p}  ({'found' if p.is_file() else 'MISSING'})" for p in wanted]
    return DatasetNotFoundError(
        f"{key} ({'train' if train else 'test'} split) not found under {root}.\n"
        "Expected files:\n" + "\n".join(lines) + "\n"
        f"Get {info['url']} and unpack it into {root} (it creates {info['folder']}/), or, when "
        f"online, let torchvision download it: `lance-cl run --download --data-root {root} ...` "
        f"or torchvision.datasets.{info['torchvision']}('{root}', download=True). "
        "Set LANCE_CL_DATA to change the default data root."
    )


def load_cifar(
    name: str, root: str | Path, train: bool, *, download: bool = False
) -> tuple[Tensor, Tensor]:
    """Load one split of CIFAR-10 / CIFAR-100: uint8 (N, 3, 32, 32) and int64 labels (N,).

    CIFAR-100 uses the 100 fine labels. When files are missing and ``download`` is True,
    torchvision fetches the archive into ``root`` (needs the network); otherwise
    :class:`DatasetNotFoundError` names the missing files and where to get them.
    A corrupt batch raises ValueError.
    """
    key = _canonical(name)
    root = Path(root).expanduser()
    wanted = cifar_expected_files(key, root, train)
    if not all(p.is_file() for p in wanted):
        if download:
            import torchvision

            try:
                getattr(torchvision.datasets, CIFAR[key]["torchvision"])(str(root), train=train, download=True)
            except Exception as e:  # offline, HTTP error, bad archive...
                err = _missing_error(key, root, wanted, train)
                raise DatasetNotFoundError(f"{err}\nThe download failed: {type(e).__name__}: {e}") from e
        if not all(p.is_file() for p in wanted):
            raise _missing_error(key, root, wanted, train)
    parts = [read_cifar_batch(p, CIFAR[key]["label_key"]) for p in wanted]
    images = torch.cat([x for x, _ in parts])
    labels = torch.cat([y for _, y in parts])
    n_classes = CIFAR[key]["n_classes"]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"{key}: labels outside 0..{n_classes - 1} in {wanted[0].parent}")
    return images, labels
