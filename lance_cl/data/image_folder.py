"""A plain class-per-folder image reader: ``<folder>/<class_name>/<image>.png|jpg|...``.

Class names are sorted and numbered 0..K-1; inside a class the files are sorted by name.
Every image is decoded with PIL, converted to ``mode`` ("RGB" or "L") and resized to
``size x size``; the result is one uint8 tensor (N, C, size, size) in memory.

Decoding tens of thousands of JPEGs takes minutes, so ``cache=True`` stores the decoded
tensors in ``<folder>.<mode><size>.pt`` next to the folder and reuses them while the list of
image files is unchanged (written atomically; skipped with a warning when the folder's parent
is not writable).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderData",
    "image_folder_cache_path",
    "list_image_folder",
    "load_image_folder",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_CACHE_VERSION = 1


@dataclass
class ImageFolderData:
    """Decoded image folder: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,) indexing
    ``classes``; ``files[i]`` is image i's path relative to the folder ("class/name.png");
    ``skipped`` lists unreadable files left out (``skip_unreadable=True``)."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    files: list[str]
    skipped: list[str] = field(default_factory=list)


def list_image_folder(
    folder: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[str], list[list[str]]]:
    """Sorted class sub-folders of ``folder`` and, per class, its sorted image file names.

    Hidden entries are ignored; only files whose suffix (case-insensitive) is in
    ``extensions`` count. Raises ValueError when there is no class folder.
    """
    folder = Path(folder)
    exts = {e.lower() for e in extensions}
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder}: no class sub-folders (expected {folder}/<class_name>/<image files>)")
    files = []
    for c in classes:
        names = sorted(
            e.name for e in os.scandir(folder / c)
            if e.is_file() and not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in exts
        )
        files.append(names)
    return classes, files


def image_folder_cache_path(folder: str | Path, size: Optional[int], mode: str) -> Path:
    """Where :func:`load_image_folder` caches ``folder``'s decoded tensors."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}.{mode}{size if size else 'orig'}.pt"


_RESAMPLE = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")  # PIL filter names


def _decode(path: Path, size: Optional[int], mode: str, resample: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert(mode)
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), resample=getattr(Image.Resampling, resample.upper()))
        arr = np.array(img, dtype=np.uint8)  # a writable copy
    return arr[:, :, None] if arr.ndim == 2 else arr  # (H, W, C)


def load_image_folder(
    folder: str | Path,
    size: Optional[int],
    *,
    mode: str = "RGB",
    resample: str = "bilinear",
    cache: bool = False,
    skip_unreadable: bool = False,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ImageFolderData:
    """Decode every image of ``folder/<class>/`` into uint8 (N, C, size, size).

    ``mode``: "RGB" (C = 3) or "L" (grey, C = 1). ``size=None`` keeps the original size (all
    images must then share it). ``resample``: PIL filter name (nearest, bilinear, bicubic,
    lanczos, box, hamming). An unreadable image raises ValueError naming it, unless
    ``skip_unreadable`` (then it is left out with a warning and listed in ``skipped``).
    Raises FileNotFoundError when ``folder`` does not exist.
    """
    folder = Path(folder).expanduser()
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if resample not in _RESAMPLE:
        raise ValueError(f"unknown resample filter {resample!r}; expected one of {sorted(_RESAMPLE)}")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    classes, per_class = list_image_folder(folder, extensions)
    listed = [f"{c}/{n}" for c, names in zip(classes, per_class) for n in names]

    cache_path = image_folder_cache_path(folder, size, mode)
    if cache and cache_path.is_file():
        try:
            saved = torch.load(cache_path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt / foreign cache: rebuild
            warnings.warn(f"ignoring unreadable cache {cache_path} ({type(e).__name__}: {e})", stacklevel=2)
            saved = None
        if (
            isinstance(saved, dict)
            and saved.get("version") == _CACHE_VERSION
            and saved.get("listed") == listed
            and saved.get("resample") == resample
        ):
            return ImageFolderData(saved["images"], saved["labels"], saved["classes"], saved["files"],
                                   saved["skipped"])

    channels = 3 if mode == "RGB" else 1
    # with a fixed size, fill one preallocated tensor (peak memory = the result)
    buffer = torch.empty((len(listed), channels, size, size), dtype=torch.uint8) if size else None
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    files: list[str] = []
    skipped: list[str] = []
    first_shape = None
    for label, (c, names) in enumerate(zip(classes, per_class)):
        for n in names:
            try:
                arr = _decode(folder / c / n, size, mode, resample)
            except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
                if not skip_unreadable:
                    raise ValueError(f"{folder / c / n}: unreadable image ({type(e).__name__}: {e})") from e
                skipped.append(f"{c}/{n}")
                continue
            if first_shape is None:
                first_shape = arr.shape
            elif arr.shape != first_shape:
                raise ValueError(
                    f"{folder / c / n}: image of shape {arr.shape[:2]} differs from the first one "
                    f"{first_shape[:2]}; pass size= to resize"
                )
            if buffer is not None:
                buffer[len(files)] = torch.from_numpy(arr).permute(2, 0, 1)
            else:
                arrays.append(arr)
            labels.append(label)
            files.append(f"{c}/{n}")
    if skipped:
        warnings.warn(
            f"{folder}: skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else ""),
            stacklevel=2,
        )
    if buffer is not None:
        images = buffer[: len(files)].clone() if skipped else buffer
    elif arrays:
        images = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
    else:
        images = torch.zeros((0, channels, 0, 0), dtype=torch.uint8)
    data = ImageFolderData(images, torch.tensor(labels, dtype=torch.int64), classes, files, skipped)

    if cache:
        tmp = cache_path.with_name(cache_path.name + f".tmp{os.getpid()}")
        try:
            torch.save(
                {"version": _CACHE_VERSION, "listed": listed, "resample": resample, "images": data.images,
                 "labels": data.labels, "classes": classes, "files": files, "skipped": skipped},
                tmp,
            )
            os.replace(tmp, cache_path)
        except OSError as e:
            warnings.warn(f"could not write the image cache {cache_path} ({e}); continuing without",
                          stacklevel=2)
            try:
                tmp.unlink()
            except OSError:
                pass
    return data
