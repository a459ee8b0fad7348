"""Downstream (and pretraining) data for ``lance-cl finetune``: every split in memory as uint8
images (N, 3, H, W) and int64 labels, resized / flipped / normalised batch by batch.

Offline data sets (read from disk, never downloaded): ``cifar10-dev-first5`` / ``cifar10-dev-last5``
(the first / last five classes of the CIFAR-10 development split ``<root>/cifar10-dev``, labels
renumbered 0..4), ``mnist``, ``fashion_mnist``. Where the user has them: ``cifar10``,
``cifar100`` (pickle batches), ``flowers102`` and ``oxford_pets`` (torchvision's layout and
downloads), ``cub200`` (an image folder ``<root>/cub200/{train,test}/<class>/<image>``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import DatasetNotFoundError, default_data_root, load_cifar, load_image_folder
from ..data import load_mnist_like
from .protocol import DATASETS

__all__ = ["DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "FinetuneData", "load_finetune_data",
           "model_input"]

# torchvision's ImageNet statistics: every backbone here sees inputs normalised this way
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# torchvision class, its folder under the root, train split, test split, number of classes
_TORCHVISION = {
    "flowers102": ("Flowers102", "flowers-102", "train", "val", 102),
    "oxford_pets": ("OxfordIIITPet", "oxford-iiit-pet", "trainval", "test", 37),
}


@dataclass
class FinetuneData:
    """uint8 images (N, 3, H, W) and int64 labels (N,) of both splits, and where they came from."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    n_classes: int
    info: dict[str, Any] = field(default_factory=dict)


def _cifar_dev(root: Path, train: bool, last: bool) -> tuple[Tensor, Tensor]:
    x, y = load_cifar("cifar10", root / "cifar10-dev", train)
    keep = (y >= 5) if last else (y < 5)
    return x[keep], y[keep] - (5 if last else 0)


def _grey_to_rgb(x: Tensor) -> Tensor:
    """uint8 (N, H, W) -> (N, 3, H, W)."""
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _torchvision_split(name: str, root: Path, train: bool, size: int,
                       download: bool) -> tuple[Tensor, Tensor]:
    import torchvision
    from torchvision.transforms import functional as TF

    cls_name, folder, train_split, test_split, _ = _TORCHVISION[name]
    split = train_split if train else test_split
    try:
        ds = getattr(torchvision.datasets, cls_name)(str(root), split=split, download=download)
    except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found or corrupted"
        raise DatasetNotFoundError(
            f"{name} ({split} split) not found under {root / folder} ({e}).\n"
            f"Let torchvision fetch it when online (`lance-cl finetune --download --data-root "
            f"{root} ...` or torchvision.datasets.{cls_name}('{root}', split='{split}', "
            f"download=True)), or place torchvision's layout there by hand.") from e
    images = torch.empty((len(ds), 3, size, size), dtype=torch.uint8)
    labels = torch.empty(len(ds), dtype=torch.int64)
    for i in range(len(ds)):
        img, label = ds[i]
        images[i] = TF.pil_to_tensor(TF.resize(img.convert("RGB"), [size, size], antialias=True))
        labels[i] = int(label)
    return images, labels


def _cub200(root: Path, train: bool, size: int) -> tuple[Tensor, Tensor]:
    folder = root / "cub200" / ("train" if train else "test")
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"cub200 ({'train' if train else 'test'} split) not found: {folder} does not exist.\n"
            "CUB-200-2011 is read as an image folder: get CUB_200_2011.tgz from "
            "https://www.vision.caltech.edu/datasets/cub_200_2011/ and sort its images/ into "
            f"{root / 'cub200'}/train/<class>/ and .../test/<class>/ with train_test_split.txt.")
    data = load_image_folder(folder, size, cache=True)
    return data.images, data.labels


def _load_split(name: str, root: Path, train: bool, size: int, download: bool) -> tuple[Tensor, Tensor]:
    if name in ("cifar10-dev-first5", "cifar10-dev-last5"):
        return _cifar_dev(root, train, last=name.endswith("last5"))
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root, train, download=download)
    if name in ("mnist", "fashion_mnist"):
        x, y = load_mnist_like(name, root, train, download=download)
        return _grey_to_rgb(x), y
    if name in _TORCHVISION:
        return _torchvision_split(name, root, train, size, download)
    return _cub200(root, train, size)


def _n_classes(name: str, train_y: Tensor) -> int:
    fixed = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10, "cub200": 200,
             "cifar10-dev-first5": 5, "cifar10-dev-last5": 5}
    if name in _TORCHVISION:
        return _TORCHVISION[name][4]
    return fixed.get(name, int(train_y.max()) + 1)


def _subset(x: Tensor, y: Tensor, limit: Optional[int]) -> tuple[Tensor, Tensor]:
    """The first ``limit`` images of a fixed shuffle (seed 0), or everything."""
    if limit is None or limit >= x.shape[0]:
        return x, y
    keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:limit]
    return x[keep], y[keep]


def load_finetune_data(name: str, data_root: Optional[str | Path] = None, *, image_size: int = 224,
                       train_limit: Optional[int] = None, test_limit: Optional[int] = None,
                       download: bool = False) -> FinetuneData:
    """Both splits of data set ``name`` (one of :data:`DATASETS`) as uint8 tensors.

    Images keep their stored size (32x32 CIFAR, 28x28 MNIST) except the torchvision / image-folder
    sets, decoded at ``image_size``; :func:`model_input` resizes batches. A missing data set
    raises :class:`DatasetNotFoundError` naming what is missing and where to get it.
    """
    key = name.lower().replace("-", "_").replace("fashionmnist", "fashion_mnist")
    key = {"cifar10_dev_first5": "cifar10-dev-first5", "cifar10_dev_last5": "cifar10-dev-last5",
           "pets": "oxford_pets", "oxfordiiitpet": "oxford_pets", "cub": "cub200"}.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    train_x, train_y = _subset(*_load_split(key, root, True, image_size, download), train_limit)
    test_x, test_y = _subset(*_load_split(key, root, False, image_size, download), test_limit)
    info = {"dataset": key, "root": str(root), "train_images": int(train_x.shape[0]),
            "test_images": int(test_x.shape[0]), "stored_size": list(train_x.shape[2:]),
            "train_limit": train_limit, "test_limit": test_limit}
    return FinetuneData(key, train_x, train_y, test_x, test_y, _n_classes(key, train_y), info)


def model_input(images: Tensor, image_size: int, flip: Optional[Tensor] = None) -> Tensor:
    """uint8 images (B, 3, H, W) -> float32 (B, 3, image_size, image_size), ImageNet-normalised.

    ``flip``: bool (B,) mask of the images to mirror horizontally (None: none)."""
    x = images.to(torch.float32) / 255.0
    if tuple(x.shape[2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=x.shape[2] > image_size)
    if flip is not None and bool(flip.any()):
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
