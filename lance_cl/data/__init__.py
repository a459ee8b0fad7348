"""Data loading: on-disk formats read without the network, and the default data root."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DatasetNotFoundError
from .idx import read_idx
from .mnist import MEAN_STD, expected_files, load_mnist_like, to_32x32x3

__all__ = [
    "DatasetNotFoundError",
    "MEAN_STD",
    "default_data_root",
    "expected_files",
    "load_mnist_like",
    "read_idx",
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
