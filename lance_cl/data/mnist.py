"""MNIST and Fashion-MNIST from the torchvision on-disk layout, without torchvision."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DatasetNotFoundError
from .idx import read_idx

__all__ = ["MNIST_LIKE", "MEAN_STD", "load_mnist_like", "to_32x32x3", "expected_files"]

# canonical name -> (torchvision folder, where the files come from)
MNIST_LIKE: dict[str, tuple[str, str]] = {
    "mnist": (
        "MNIST",
        "https://ossci-datasets.s3.amazonaws.com/mnist/ (torchvision's mirror) or "
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion_mnist": (
        "FashionMNIST",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ "
        "(https://github.com/zalandoresearch/fashion-mnist)",
    ),
}

# mean / std of the training pixels scaled to [0, 1]
MEAN_STD: dict[str, tuple[float, float]] = {
    "mnist": (0.1307, 0.3081),
    "fashion_mnist": (0.2860, 0.3530),
}


def _canonical(name: str) -> str:
    key = name.lower().replace("-", "_")
    if key == "fashionmnist":
        key = "fashion_mnist"
    if key not in MNIST_LIKE:
        raise ValueError(f"unknown MNIST-like data set {name!r}; expected one of {sorted(MNIST_LIKE)}")
    return key


def expected_files(name: str, root: str | Path, train: bool) -> tuple[Path, Path]:
    """Paths (without the optional ``.gz``) of the images and labels files of one split."""
    folder = Path(root).expanduser() / MNIST_LIKE[_canonical(name)][0] / "raw"
    split = "train" if train else "t10k"
    return folder / f"{split}-images-idx3-ubyte", folder / f"{split}-labels-idx1-ubyte"


def _find(path: Path) -> Path | None:
    """The plain file if present (torchvision extracts it), else the ``.gz``, else None."""
    gz = path.with_name(path.name + ".gz")
    for p in (path, gz):
        if p.is_file():
            return p
    return None


def load_mnist_like(
    name: str, root: str | Path, train: bool, *, download: bool = False
) -> tuple[Tensor, Tensor]:
    """Load one split of MNIST / Fashion-MNIST from ``<root>/<MNIST|FashionMNIST>/raw``.

    Returns images uint8 (N, 28, 28) and labels int64 (N,). Files may be gzip-compressed or
    plain. When a file is missing and ``download`` is True, torchvision fetches the data set
    into ``root`` (needs the network). Raises DatasetNotFoundError when a file is (still)
    missing, ValueError when one is corrupt.
    """
    key = _canonical(name)
    wanted = expected_files(key, root, train)
    found = [_find(p) for p in wanted]
    failure = ""
    if download and any(f is None for f in found):
        import torchvision

        try:
            getattr(torchvision.datasets, MNIST_LIKE[key][0])(str(Path(root).expanduser()), train=train, download=True)
        except Exception as e:  # offline, HTTP error...: fall through to the missing-files error
            failure = f"\nThe download failed: {type(e).__name__}: {e}"
        found = [_find(p) for p in wanted]
    if any(f is None for f in found):
        folder, source = MNIST_LIKE[key]
        lines = [
            f"  {p}[.gz]  ({'found' if f is not None else 'MISSING'})" for p, f in zip(wanted, found)
        ]
        raise DatasetNotFoundError(
            f"{key} ({'train' if train else 'test'} split) not found under {Path(root).expanduser()}.\n"
            "Expected files (plain or .gz):\n" + "\n".join(lines) + "\n"
            f"Get them from {source}, or let torchvision download them when online: "
            f"`lance-cl run --download --data-root <root> ...` or "
            f"torchvision.datasets.{folder}(root, download=True). "
            "Set LANCE_CL_DATA to change the default data root." + failure
        )
    img_path, lbl_path = found  # type: ignore[misc]
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != "uint8":
        raise ValueError(f"{img_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != "uint8":
        raise ValueError(f"{lbl_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} labels")
    return torch.from_numpy(images), torch.from_numpy(labels.astype("int64"))


def to_32x32x3(
    images_uint8: Tensor,
    mean: float | Sequence[float] = MEAN_STD["mnist"][0],
    std: float | Sequence[float] = MEAN_STD["mnist"][1],
) -> Tensor:
    """Grey images (N, H, W) or (N, 1, H, W) uint8, H, W <= 32 -> float32 (N, 3, 32, 32).

    Zero-pads to 32x32 (2 pixels each side for 28x28), scales to [0, 1], normalises with
    ``(x - mean) / std`` (scalars or 3 per-channel values) and repeats grey to 3 channels.
    The padded border therefore equals ``-mean / std``.
    """
    x = images_uint8
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"expected (N, H, W) or (N, 1, H, W) images, got shape {tuple(images_uint8.shape)}")
    h, w = x.shape[1:]
    if h > 32 or w > 32:
        raise ValueError(f"images of {h}x{w} do not fit in 32x32")
    top, left = (32 - h) // 2, (32 - w) // 2
    x = F.pad(x.to(torch.float32) / 255.0, (left, 32 - w - left, top, 32 - h - top))
    x = x.unsqueeze(1).expand(-1, 3, -1, -1)
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    if m.shape[0] not in (1, 3) or s.shape[0] not in (1, 3):
        raise ValueError("mean and std must be scalars or have 3 entries")
    return ((x - m) / s).contiguous()
