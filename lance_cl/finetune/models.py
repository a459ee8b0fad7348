"""Backbones and their weights for ``lance-cl finetune``.

Models: torchvision's ``mobilenet_v2``, ``resnet18``, ``resnet34`` and the zoo's
``mobilenet_blocks`` (:class:`lance_cl.models.MobileNetV2Blocks`, small enough to pretrain and
fine-tune on a CPU). Weights: a torchvision weight name (``IMAGENET1K_V1``, ``DEFAULT`` or
``MobileNet_V2_Weights.IMAGENET1K_V1``; downloaded by torchvision when not cached) or a local
``state_dict`` file (``lance-cl finetune --pretrain FILE`` writes one). The classifier is always
replaced by a fresh one with the downstream number of classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["MODELS", "WeightsNotFoundError", "build_backbone", "head_name", "reset_head"]

MODELS: tuple[str, ...] = ("mobilenet_v2", "resnet18", "resnet34", "mobilenet_blocks")
_HEADS = {"mobilenet_v2": "classifier.1", "resnet18": "fc", "resnet34": "fc",
          "mobilenet_blocks": "head"}


class WeightsNotFoundError(FileNotFoundError):
    """The weights asked for are neither a readable local file nor obtainable from torchvision."""


def head_name(model_name: str) -> str:
    """Name of the classifier Linear of ``model_name``."""
    return _HEADS[model_name]


def _architecture(name: str, n_classes: int) -> nn.Module:
    if name == "mobilenet_blocks":
        from ..models.mobilenet import MobileNetV2Blocks  # lance_cl.models loads Avalanche

        return MobileNetV2Blocks(in_channels=3, n_classes=n_classes)
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=n_classes)


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or Path(text).suffix in (".pt", ".pth", ".bin", ".ckpt")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated...
        raise WeightsNotFoundError(f"weights file {path} is not a readable torch state_dict "
                                   f"({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsNotFoundError(f"weights file {path} holds a {type(obj).__name__}, not a "
                                   f"state_dict (a dict of parameter name -> tensor)")
    return obj


def _torchvision_state_dict(model_name: str, weight_name: str) -> dict[str, torch.Tensor]:
    if model_name == "mobilenet_blocks":
        raise WeightsNotFoundError(
            f"--weights {weight_name!r}: {model_name} has no torchvision weights; give a local "
            f"state_dict file (make one with `lance-cl finetune --pretrain FILE --model "
            f"{model_name} --dataset cifar10-dev-first5`)")
    from torchvision.models import get_model_weights

    enum = get_model_weights(model_name)
    member = weight_name.rsplit(".", 1)[-1]
    if member not in enum.__members__:
        raise WeightsNotFoundError(
            f"--weights {weight_name!r} is neither a file nor a torchvision weight of {model_name} "
            f"(those are {', '.join(enum.__members__)})")
    weights = enum[member]
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # offline, HTTP error, corrupt cache
        raise WeightsNotFoundError(
            f"torchvision could not provide {enum.__name__}.{member} ({type(e).__name__}: {e}).\n"
            f"Download {weights.url} on a machine with network access into "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or pass the file itself: "
            f"--weights /path/to/{weights.url.rsplit('/', 1)[-1]}") from e


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], head: str, source: str) -> list[str]:
    """Load ``state`` into ``model`` except a classifier of another size; returns skipped keys."""
    own = model.state_dict()
    skipped = [k for k in state if k.startswith(head + ".") and k in own and state[k].shape != own[k].shape]
    kept = {k: v for k, v in state.items() if k not in skipped}
    result = model.load_state_dict(kept, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head + ".")]
    if missing or result.unexpected_keys:
        raise WeightsNotFoundError(
            f"{source} does not fit this model: missing keys {missing[:5]}, unexpected keys "
            f"{list(result.unexpected_keys)[:5]} (is it a state_dict of the same architecture?)")
    return skipped


def build_backbone(name: str, n_classes: int, weights: Optional[str] = None) -> tuple[nn.Module, dict[str, Any]]:
    """Model ``name`` with a fresh ``n_classes`` classifier and the given weights (None: random).

    Returns (model, info) where info records the weights' source and the classifier keys that
    were not loaded. Raises :class:`WeightsNotFoundError` when the weights cannot be had.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    model = _architecture(name, n_classes)
    info: dict[str, Any] = {"model": name, "weights": weights, "head": head_name(name)}
    if weights is None:
        info["source"] = "random initialisation"
        return model, info
    path = Path(weights).expanduser()
    if path.is_file():
        state, info["source"] = _read_state_dict(path), f"state_dict file {path.resolve()}"
    elif _looks_like_path(weights):
        raise WeightsNotFoundError(
            f"weights file {path} does not exist. Make it with `lance-cl finetune --pretrain {path} "
            f"--model {name} --dataset cifar10-dev-first5` (offline), or give a torchvision weight "
            f"name such as IMAGENET1K_V1 for mobilenet_v2 / resnet18 / resnet34")
    else:
        state, info["source"] = _torchvision_state_dict(name, weights), f"torchvision {weights}"
    info["skipped_keys"] = _load_backbone(model, state, head_name(name), info["source"])
    return model, info


def reset_head(model: nn.Module, model_name: str, seed: int) -> None:
    """Re-draw the classifier's weights from ``seed`` (every method of a seed starts from it)."""
    head = model.get_submodule(head_name(model_name))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head.reset_parameters()
