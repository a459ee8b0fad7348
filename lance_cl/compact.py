"""Compact saved tensors for a whole model: ``compact_activations(model)`` swaps every ReLU /
ReLU6 / Hardtanh / LeakyReLU, Dropout, MaxPool2d and BatchNorm for its compact version (same
Parameters, buffers and state_dict; exact forward; only what backward keeps changes), and can mark
segments to be recomputed in backward. ``uncompact_activations(model)`` undoes it.

Works on any model built from these modules (torchvision's ResNet and MobileNetV2, Avalanche's
models, the models of :mod:`lance_cl.models`); ops called functionally (``F.relu(x)`` inside a
forward) are not reached and keep their plain form.
"""
from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor, nn

from .core.compact import BATCH_NORM_STORAGES, DROPOUT_MODES, recompute_segment
from .core.compact.recompute import check_tail
from .layers.compact import COMPACT_MODULES, CompactModule
from .layers.swap import set_submodule

KINDS = ("activation", "dropout", "pooling", "batch_norm")


@dataclass
class CompactRow:
    name: str
    kind: str       # activation, dropout, pooling, batch_norm, segment
    type: str       # the plain module type, or "segment"
    saves: str


class CompactReport(list):
    """One :class:`CompactRow` per compacted module or recomputed segment."""

    def __str__(self) -> str:
        head = f"{'module':<32} {'type':<14} saves"
        lines = [head, "-" * (len(head) + 20)]
        lines += [f"{r.name:<32} {r.type:<14} {r.saves}" for r in self]
        return "\n".join(lines)


def _recomputed_forward(module: nn.Module, forward, *args, tail: str = "recompute",
                        **kwargs) -> Tensor:
    if len(args) != 1 or kwargs:
        raise TypeError(f"a recomputed segment takes one tensor input; {type(module).__name__} got "
                        f"{len(args)} positional and {len(kwargs)} keyword arguments")
    # a Sequential applies its children in order: a conv -> BatchNorm -> per-sample one is chunked
    modules = tuple(module) if isinstance(module, nn.Sequential) else None
    return recompute_segment(forward, args[0], module, modules=modules, tail=tail)


def _is_recomputed(module: nn.Module) -> bool:
    """True when ``module``'s forward was wrapped by ``compact_activations(recompute=...)``."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _recomputed_forward


def _mark_recompute(model: nn.Module, name: str, tail: str) -> None:
    declared = getattr(model, "segment_names", lambda: ())()
    named = dict(model.named_modules())
    if name in declared:
        model.recomputed_segments = set(getattr(model, "recomputed_segments", set())) | {name}
        model.segment_tail = tail
    elif name and name in named:
        module = named[name]
        if _is_recomputed(module):
            del module.forward                   # marked before: take this call's tail option
        if "forward" not in module.__dict__:
            module.forward = functools.partial(_recomputed_forward, module, module.forward,
                                               tail=tail)
    else:
        raise ValueError(f"recompute={name!r} is neither a submodule nor a segment of "
                         f"{type(model).__name__} (segments it declares: {list(declared) or 'none'}; "
                         f"submodules look like {[n for n in named if n][:6]})")


def compact_activations(model: nn.Module, *, batch_norm: str = "float", dropout: str = "packed",
                        kinds: Sequence[str] = KINDS, layers: Optional[Sequence[str]] = None,
                        recompute: Sequence[str] = (), segment_tail: str = "recompute"
                        ) -> CompactReport:
    """Swap the model's activation, dropout, max-pool and batch-norm modules in place.

    batch_norm: storage of the normalised input, "float" (exact), "bf16" or "int8" (approximate,
    explicit opt-in). dropout: "packed" (1-bit mask) or "regenerate" (mask rebuilt from a seed).
    kinds: which of ``KINDS`` to compact. layers: optional module-name globs to restrict to.
    recompute: submodule names (or segments the model declares, e.g. AlexNet5's "stem") whose
    forward is recomputed in backward, keeping only their input. segment_tail: "recompute", or
    "keep": a recomputed conv -> BatchNorm -> per-sample chain also keeps its per-sample ops'
    1-bit masks and pool offsets from the forward (a faster backward for those bytes; docs/memory.md).
    Returns the report.
    """
    if batch_norm not in BATCH_NORM_STORAGES:
        raise ValueError(f"batch_norm={batch_norm!r}: choose one of {BATCH_NORM_STORAGES}")
    if dropout not in DROPOUT_MODES:
        raise ValueError(f"dropout={dropout!r}: choose one of {DROPOUT_MODES}")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"kinds={unknown}: choose from {KINDS}")
    if isinstance(recompute, str):
        recompute = (recompute,)
    check_tail(segment_tail)
    options = {"batch_norm": batch_norm, "dropout": dropout}
    for name, module in list(model.named_modules()):
        if layers is not None and not any(fnmatch.fnmatchcase(name, p) for p in layers):
            continue
        if isinstance(module, CompactModule):
            module = module.to_plain()
        cls = COMPACT_MODULES.get(type(module))
        if cls is None or cls.kind not in kinds:
            continue
        new = cls.from_module(module, **{k: options[k] for k in cls.options})
        if name:
            set_submodule(model, name, new)
        else:
            raise ValueError(f"the model itself is a {type(module).__name__}: wrap it in a container")
    for name in recompute:
        _mark_recompute(model, name, segment_tail)
    return compact_report(model)


def stem_segments(model: nn.Module) -> tuple[str, ...]:
    """("stem",) when the model declares a "stem" segment or has a submodule named "stem" (the
    block that reads the input batch, whose recomputation costs one small block's forward), else ()."""
    declared = getattr(model, "segment_names", lambda: ())()
    has_module = isinstance(getattr(model, "stem", None), nn.Module)
    return ("stem",) if "stem" in declared or has_module else ()


def expansion_segments(model: nn.Module, min_ratio: float = 2.0) -> tuple[str, ...]:
    """Names of the ``nn.Sequential`` submodules made of a 1x1 ``Conv2d`` that widens its input
    by at least ``min_ratio`` (out / in channels), a ``BatchNorm2d`` and an activation (ReLU,
    ReLU6, Hardtanh, LeakyReLU): the expansion layers of inverted residual blocks (MobileNetV2,
    torchvision's included, whose last 1x1 conv block qualifies as well). Recomputing one in
    backward keeps its input (C_in channels) instead of the BatchNorm's normalised map and the
    activation's mask (>= min_ratio x C_in channels), for one more 1x1 conv, normalisation and
    activation per step."""
    activations = tuple(t for t, c in COMPACT_MODULES.items() if c.kind == "activation")
    names = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, nn.Sequential) or len(module) != 3:
            continue
        conv, norm, act = module
        if (isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1)
                and conv.out_channels >= min_ratio * conv.in_channels
                and isinstance(norm, nn.BatchNorm2d) and isinstance(act, activations)):
            names.append(name)
    return tuple(names)


def default_recompute(model: nn.Module) -> tuple[str, ...]:
    """The segments exact compaction recomputes in backward unless told otherwise (the bench's
    ``+compact`` variants, the recipes' compaction): the stem (:func:`stem_segments`) and the
    expansion layers (:func:`expansion_segments`)."""
    return stem_segments(model) + expansion_segments(model)


def recomputed_layer_names(model: nn.Module) -> set[str]:
    """Qualified names of the modules whose activations ``model`` recomputes in backward: the
    chains of its recomputed declared segments, and every recomputed submodule with everything
    inside it.
    Their saved tensors live only during their own backward, so compressing them saves no
    memory (a segment the model declares without its chain is not listed)."""
    names: set[str] = set()
    for segment in getattr(model, "recomputed_segments", ()):
        names.update(getattr(model, "segment_chains", {}).get(segment, ()))
    for name, module in model.named_modules():
        if _is_recomputed(module):
            for sub, _ in module.named_modules():      # sub == "": the module itself
                qualified = ".".join(part for part in (name, sub) if part)
                if qualified:
                    names.add(qualified)
    return names


def _segment_saves(tail: str) -> str:
    if tail == "keep":
        return "its input, and its per-sample ops' masks and offsets"
    return "its input (recomputed in backward)"


def compact_report(model: nn.Module) -> CompactReport:
    """The compacted modules and recomputed segments of ``model``."""
    rows = CompactReport()
    for name in sorted(getattr(model, "recomputed_segments", ())):
        rows.append(CompactRow(name, "segment", "segment",
                               _segment_saves(getattr(model, "segment_tail", "recompute"))))
    for name, module in model.named_modules():
        if _is_recomputed(module):
            rows.append(CompactRow(name, "segment", type(module).__name__,
                                   _segment_saves(module.forward.keywords["tail"])))
        if isinstance(module, CompactModule):
            rows.append(CompactRow(name, module.kind, module.plain_type.__name__, module.saves()))
    return rows


def uncompact_activations(model: nn.Module) -> nn.Module:
    """Restore the plain modules (same Parameters and buffers) and stop recomputing; returns model."""
    for name, module in list(model.named_modules()):
        if _is_recomputed(module):
            del module.forward
        if isinstance(module, CompactModule) and name:
            set_submodule(model, name, module.to_plain())
    if hasattr(model, "recomputed_segments"):
        model.recomputed_segments = set()
    model.__dict__.pop("segment_tail", None)
    return model
