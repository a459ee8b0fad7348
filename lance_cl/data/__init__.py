"""Data loading: on-disk formats read without the network, and the default data root."""

from __future__ import annotations

import os
from pathlib import Path

from .cifar import GPM_CIFAR_MEAN, GPM_CIFAR_STD, cifar_expected_files, load_cifar, read_cifar_batch
from .errors import DatasetNotFoundError
from .idx import read_idx
from .image_folder import ImageFolderData, list_image_folder, load_image_folder
from .miniimagenet import MINIIMAGENET_MEAN, MINIIMAGENET_STD, load_miniimagenet
from .mnist import MEAN_STD, expected_files, load_mnist_like, to_32x32x3
from .notmnist import NOTMNIST_MEAN, NOTMNIST_STD, load_notmnist
from .svhn import SVHN_MEAN, SVHN_STD, load_svhn, svhn_expected_file
from .tensors import NormalizedImages

__all__ = [
    "DatasetNotFoundError",
    "GPM_CIFAR_MEAN",
    "GPM_CIFAR_STD",
    "ImageFolderData",
    "MEAN_STD",
    "MINIIMAGENET_MEAN",
    "MINIIMAGENET_STD",
    "NOTMNIST_MEAN",
    "NOTMNIST_STD",
    "NormalizedImages",
    "SVHN_MEAN",
    "SVHN_STD",
    "cifar_expected_files",
    "default_data_root",
    "expected_files",
    "list_image_folder",
    "load_cifar",
    "load_image_folder",
    "load_miniimagenet",
    "load_mnist_like",
    "load_notmnist",
    "load_svhn",
    "read_cifar_batch",
    "read_idx",
    "svhn_expected_file",
    "to_32x32x3",
]


def default_data_root() -> Path:
    """Where data sets live when no ``--data-root`` is given.

    1. ``$LANCE_CL_DATA`` when set (returned even if it does not exist yet, so downloads go there);
    2. ``<checkout>/../shared/data`` when it exists (only meaningful for a source checkout:
       computed from this file's location);
    3. ``~/.lance_cl/data``.
    """
    env = os.environ.get("LANCE_CL_DATA")
    if env:
        return Path(env).expanduser()
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path.home() / ".lance_cl" / "data"
