"""What a fine-tuning run does, in one dataclass: model, weights, data, layers, methods and their
options, schedule. Everything here is written into ``finetune.json``.

Two presets (see docs/finetune.md):

* ``ASI_PROTOCOL``: the fine-tuning recipe of ASI (Nguyen et al., ICML 2025, appendix B.1 and its
  scripts ``classification/scripts/conv_models/*``): 224x224 inputs, ImageNet normalisation,
  SGD lr 0.05 with momentum 0 and weight decay 1e-4, cosine annealing over 50 epochs, batch 128,
  L2 gradient clipping at 2.0, BatchNorm in eval mode, HOSVD_eps / ASI at eps 0.8;
* ``OFFLINE_PROTOCOL``: the same recipe scaled to two CPU cores (32x32 images, a small
  MobileNetV2-style model pretrained here, few epochs, subsets of the data).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

__all__ = ["ASI_PROTOCOL", "DATASETS", "DATASETS_HELP", "HEAD_MODES", "parse_seeds", "FinetuneConfig", "METHOD_NAMES", "OFFLINE_PROTOCOL", "method_options",
           "parse_method_values"]

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "flowers102", "oxford_pets", "cub200",
                             "cifar10-dev-first5", "cifar10-dev-last5", "mnist", "fashion_mnist")
DATASETS_HELP = ("cifar10, cifar100, flowers102, oxford_pets, cub200 (where you have them); offline: "
                 "cifar10-dev-first5, cifar10-dev-last5, mnist, fashion_mnist")
METHOD_NAMES: tuple[str, ...] = ("vanilla", "lance", "asi", "hosvd", "gradient_filter")
# methods whose ranks come from an energy threshold eps (or a byte budget for lance / asi)
EPS_METHODS: tuple[str, ...] = ("lance", "asi", "hosvd")
BUDGET_METHODS: tuple[str, ...] = ("lance", "asi")
HEAD_MODES: tuple[str, ...] = ("plain", "compressed")


@dataclass
class FinetuneConfig:
    """One fine-tuning experiment: every (layers, method, seed) combination is run.

    ``layers``: ints N or name globs. ``head``: ``"plain"`` (as the ASI and HOSVD_eps code: N
    counts the last N Conv2d layers, and the classifier trains with plain autograd on top) or
    ``"compressed"`` (N counts Conv2d and Linear layers in execution order, so the classifier is
    one of them and is compressed like the rest). ``compact``: every method's model also gets
    :func:`lance_cl.compact_activations` (exact: BatchNorm, ReLU6, dropout and pooling between the
    fine-tuned layers save compact tensors), so the whole-step columns show both savings.
    ``eps`` / ``budget``: per method (bytes of saved activations over the fine-tuned layers for
    ``budget``; a budget replaces eps for that method). ``compress_batch``: per method, whether
    the batch mode is compressed too (absent: the method's default, docs/core.md; ``lance=True``
    is LANCE's published variant, a batch factor fixed at calibration). ``train_limit`` / ``test_limit`` keep the
    first images of a seeded shuffle of each split (None: all).
    """

    model: str = "mobilenet_v2"
    weights: Optional[str] = None
    dataset: str = "cifar10"
    data_root: Optional[str] = None
    download: bool = False
    layers: tuple[Union[int, str], ...] = (2, 4)
    head: str = "plain"
    compact: bool = False                # lance_cl.compact_activations on every method's model
    methods: tuple[str, ...] = METHOD_NAMES
    eps: dict[str, float] = field(default_factory=lambda: {"lance": 0.7, "asi": 0.8, "hosvd": 0.8})
    budget: dict[str, float] = field(default_factory=dict)
    compress_batch: dict[str, bool] = field(default_factory=dict)
    radius: int = 2                      # gradient_filter block side R
    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 1e-4
    clip_norm: Optional[float] = 2.0
    image_size: int = 224
    flip: bool = True                    # random horizontal flips (the same for every method)
    lance_calibration_batches: int = 100
    asi_calibration_batches: int = 1
    eval_every: int = 1                  # test accuracy every k epochs (and after the last)
    seeds: tuple[int, ...] = (233,)
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    device: str = "cpu"
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHOD_NAMES]
        if bad or not self.methods:
            raise ValueError(f"unknown method(s) {bad or '(none given)'}; choose from "
                             f"{', '.join(METHOD_NAMES)}")
        for what, table, allowed in (("eps", self.eps, EPS_METHODS),
                                     ("budget", self.budget, BUDGET_METHODS),
                                     ("compress_batch", self.compress_batch, EPS_METHODS)):
            wrong = [m for m in table if m not in allowed]
            if wrong:
                raise ValueError(f"{what} given for {wrong}: only {', '.join(allowed)} take {what}")
        for name, value in (("epochs", self.epochs), ("batch_size", self.batch_size),
                            ("image_size", self.image_size), ("radius", self.radius),
                            ("eval_every", self.eval_every),
                            ("lance_calibration_batches", self.lance_calibration_batches),
                            ("asi_calibration_batches", self.asi_calibration_batches)):
            if int(value) < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr!r} must be positive")
        if self.head not in HEAD_MODES:
            raise ValueError(f"head={self.head!r}: choose {' or '.join(HEAD_MODES)} (plain: the "
                             f"classifier trains uncompressed on top of the N convolutions)")
        for spec in self.layers:
            if isinstance(spec, bool) or not isinstance(spec, (int, str)):
                raise ValueError(f"layers: {spec!r} is neither a count N nor a name glob")
            if isinstance(spec, int) and spec < 1:
                raise ValueError(f"layers: N={spec} must be at least 1")

    def with_(self, **changes: Any) -> "FinetuneConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


ASI_PROTOCOL = FinetuneConfig()

OFFLINE_PROTOCOL = FinetuneConfig(
    model="mobilenet_blocks", dataset="cifar10-dev-last5", batch_size=64, lr=0.05,
    image_size=32, lance_calibration_batches=8, seeds=(0, 1, 2), train_limit=2000,
    test_limit=2000, threads=1, eval_every=4, epochs=4, eps={"lance": 0.7, "asi": 0.8, "hosvd": 0.8})


def method_options(config: FinetuneConfig, method: str) -> dict[str, Any]:
    """Keyword options ``lance_cl.compress`` gets for ``method`` under ``config``."""
    if method == "gradient_filter":
        return {"radius": config.radius}
    batch = ({"compress_batch": bool(config.compress_batch[method])}
             if method in config.compress_batch else {})
    if method in config.budget:
        return {"budget": float(config.budget[method]), **batch}
    if method in EPS_METHODS:
        return {"eps": float(config.eps.get(method, 0.7)), **batch}
    return {}


def parse_method_values(text: str, allowed: tuple[str, ...], what: str) -> dict[str, float]:
    """'0.7' -> the same value for every allowed method; 'lance=0.7,asi=0.8' -> per method."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.rpartition("=")
        names = [n for n in allowed if fnmatch.fnmatchcase(n, name.strip())] if sep else list(allowed)
        if not names:
            raise ValueError(f"--{what} {text!r}: {name.strip()!r} is not one of {', '.join(allowed)}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--{what} {text!r}: {value!r} is not a number") from None
        out.update({n: number for n in names})
    if not out:
        raise ValueError(f"--{what} {text!r}: no value given")
    return out


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0' -> (0,); '0,1,2' and '0-2' -> (0, 1, 2)."""
    seeds: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            seeds += list(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected integers like '0', '0,1,2' or '0-2'") from None
    if not seeds:
        raise ValueError(f"--seeds {text!r}: no seed given")
    return tuple(seeds)
