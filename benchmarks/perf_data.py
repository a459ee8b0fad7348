"""The bench's data: real FashionMNIST images padded to 32x32x3, split into disjoint slices
(training images, calibration batches, the measured batch)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import Tensor

from lance_cl.data import MEAN_STD, DatasetNotFoundError, default_data_root, expected_files
from lance_cl.data import load_mnist_like, to_32x32x3

from .perf_config import BenchDataError, BenchSetupError


def load_bench_data(data_root: Optional[str | Path] = None, limit: Optional[int] = None
                    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Real FashionMNIST as (N, 3, 32, 32) float32 normalised images and int64 labels.

    Uses the train split when present, else the test (t10k) split; only the first ``limit`` images
    are converted (the bench needs a few thousand). Raises :class:`BenchDataError` naming every
    file looked for and ``--data-root`` when neither split is on disk.
    """
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    for train in (True, False):
        try:
            images, labels = load_mnist_like("fashion_mnist", root, train=train)
        except DatasetNotFoundError:
            continue
        available = int(images.shape[0])
        if limit is not None:
            images, labels = images[:limit], labels[:limit].clone()
        x = to_32x32x3(images, *MEAN_STD["fashion_mnist"])
        info = {"dataset": "FashionMNIST", "split": "train" if train else "test (t10k)",
                "root": str(root), "n_images_in_split": available, "n_images_used": int(x.shape[0]),
                "preprocessing": "28x28 zero-padded to 32x32, normalised with the FashionMNIST "
                                 "mean/std, grey repeated to 3 channels"}
        return x, labels, info
    lines = []
    for train in (True, False):
        for p in expected_files("fashion_mnist", root, train):
            lines.append(f"  {p}[.gz]")
    raise BenchDataError(
        f"lance-cl bench measures on real FashionMNIST images, but none were found under {root}.\n"
        "Expected (plain or .gz; the train split is used when present, else the test split):\n"
        + "\n".join(lines) + "\n"
        "Pass --data-root DIR (the folder that contains FashionMNIST/raw/), or set LANCE_CL_DATA. "
        "The files come from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ or "
        "torchvision.datasets.FashionMNIST(DIR, download=True)."
    )


@dataclass
class BenchSplit:
    train_x: Tensor
    train_y: Tensor
    calib: list[tuple[Tensor, Tensor]]
    measure: tuple[Tensor, Tensor]


def split_images(x: Tensor, y: Tensor, batch_size: int, n_calib: int) -> BenchSplit:
    """Disjoint slices: measured batch = last ``batch_size`` images, calibration batches before it,
    training images = the rest."""
    need = batch_size * (n_calib + 2)
    if x.shape[0] < need:
        raise BenchSetupError(f"the bench needs at least {need} images for batch size {batch_size} "
                         f"({n_calib} calibration batches, 1 measured batch, 1+ training batch); "
                         f"got {x.shape[0]}")
    n = x.shape[0]
    m0 = n - batch_size
    c0 = m0 - n_calib * batch_size
    # clones: a batch that is a slice of the data set would keep (and be accounted as) all of it
    calib = [(x[c0 + i * batch_size: c0 + (i + 1) * batch_size].clone(),
              y[c0 + i * batch_size: c0 + (i + 1) * batch_size].clone()) for i in range(n_calib)]
    return BenchSplit(train_x=x[:c0], train_y=y[:c0], calib=calib,
                  measure=(x[m0:].clone(), y[m0:].clone()))

