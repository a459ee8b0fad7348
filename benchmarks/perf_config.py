"""What ``lance-cl bench`` measures: its configuration and the methods it runs, read from the
method registry (:data:`lance_cl.METHODS`), so a registered method is benchmarked without any
change here.

A bench method is a registered method name, optionally followed by a compaction suffix (the ops
between the weight layers save compact tensors too): ``+compact`` (exact gradients, the stem
and the expansion layers of inverted residual blocks recomputed in backward:
:func:`lance_cl.compact.default_recompute`),
``+compact_nostem`` (the same with nothing recomputed), ``+compact_keep`` (the recomputed
stem keeps its per-sample ops' 1-bit masks and pool offsets: ``segment_tail="keep"``),
``+compact_bf16`` / ``+compact_int8`` (BatchNorm's normalised input in reduced precision).
Each method class says which suffixes it is offered with and which run by default (``bench_variants``,
``bench_default_variants``), which config fields become its options (``bench_options``) and how
many calibration batches it gets (``bench_calibration``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from lance_cl.compressors import METHODS, Compressor
from lance_cl.data import DatasetNotFoundError

# suffix -> (BatchNorm storage, recompute the stem and the expansion layers, segment tail)
COMPACT_VARIANTS: dict[str, tuple[str, bool, str]] = {
    "+compact": ("float", True, "recompute"), "+compact_nostem": ("float", False, "recompute"),
    "+compact_keep": ("float", True, "keep"),
    "+compact_bf16": ("bf16", True, "recompute"), "+compact_int8": ("int8", True, "recompute")}
MODELS: tuple[str, ...] = ("alexnet", "mobilenet")
REFERENCE = "vanilla"      # the method every other one is measured against (always runs first)


def bench_methods() -> tuple[str, ...]:
    """Every bench method: the registered methods in registration order, then each one's
    compaction variants in the same order."""
    return tuple(METHODS) + tuple(name + suffix for name, cls in METHODS.items()
                                  for suffix in cls.bench_variants)


def default_methods() -> tuple[str, ...]:
    """The bench methods run when ``--methods`` is not given."""
    return tuple(name + suffix for name, cls in METHODS.items()
                 for suffix in cls.bench_default_variants)


def split_variant(name: str) -> tuple[str, Optional[tuple[str, bool, str]]]:
    """'lance+compact_bf16' -> ('lance', ('bf16', True, 'recompute')); 'asi' -> ('asi', None)."""
    for suffix in sorted(COMPACT_VARIANTS, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)], COMPACT_VARIANTS[suffix]
    return name, None


def method_of(name: str) -> type[Compressor]:
    """The registered class behind a bench method name."""
    return METHODS[split_variant(name)[0]]


class BenchDataError(DatasetNotFoundError):
    """FashionMNIST is not on disk where the bench looks for it."""


class BenchSetupError(RuntimeError):
    """The bench cannot run as configured (e.g. ``--device cuda`` without a CUDA device)."""


@dataclass
class BenchConfig:
    """Everything that decides what the bench measures (all of it is written into the JSON)."""

    models: tuple[str, ...] = MODELS
    methods: tuple[str, ...] = field(default_factory=default_methods)
    batch_size: int = 64
    repeats: int = 31            # timed steps per method (median reported)
    warmup: int = 3              # untimed steps per method before timing
    train_steps: int = 48        # SGD steps of the vanilla model before measuring
    lr: float = 0.01
    eps: float = 0.7             # lance / asi / hosvd energy threshold
    radius: int = 2              # gradient_filter patch side R
    lance_calibration_batches: int = 8
    asi_calibration_batches: int = 1
    threads: Optional[int] = None  # None: leave torch's default
    device: str = "cpu"
    data_root: Optional[str] = None
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_preset(cls, **overrides: Any) -> "BenchConfig":
        """Fewer repeats and training steps: under a minute on 2 CPU cores."""
        base = dict(repeats=5, warmup=1, train_steps=12, quick=True)
        base.update(overrides)
        return cls(**base)


def method_options(name: str, cfg: BenchConfig) -> dict[str, Any]:
    """Options the bench gives a method: its ``bench_options`` config fields, by name."""
    return {option: getattr(cfg, option) for option in method_of(name).bench_options}


def calibration_batches(name: str, cfg: BenchConfig) -> Optional[int]:
    """Calibration batches of a bench method (None: it needs no calibration)."""
    cls = method_of(name)
    if cls.bench_calibration is not None:
        return int(getattr(cfg, cls.bench_calibration))
    return 1 if cls.needs_calibration else None


def max_calibration_batches(cfg: BenchConfig) -> int:
    """Calibration batches set aside: the most any registered method takes."""
    return max([calibration_batches(name, cfg) or 0 for name in METHODS] + [1])


def method_layers(name: str, model: nn.Module, body: list[str]) -> list[str]:
    """The layers of ``body`` a bench method compresses: those its method supports."""
    cls, named = method_of(name), dict(model.named_modules())
    return [n for n in body if cls.supports(named[n])]
