"""lance-cl: memory-frugal training and continual learning with compressed activations.

Core API::

    report = lance_cl.compress(model, "lance", layers=4, example_inputs=x, eps=0.7)
    lance_cl.calibrate(model, loader, num_batches=100)   # or lance_cl.Calibration(model).run(...)
    stats = lance_cl.measure_activation_memory(model, x, loss_fn)
    lance_cl.uncompress(model)
    lance_cl.compact_activations(model)   # ReLU / dropout / max-pool / BatchNorm save compact forms

Continual learning: ``lance_cl.LanceCLPlugin`` (and the ``GPMPlugin`` / ``SGPPlugin`` baselines)
plug into any Avalanche strategy.

The names are loaded on first use (PEP 562), so that importing a submodule that needs no torch
(the command line's parser, a sweep's driver: docs/sweeps.md) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # the same names, eagerly, for type checkers and editors
    from .accounting import layer_flops, measure_activation_memory
    from .calibration import Calibration
    from .cl.plugins import GPMPlugin, LanceCLPlugin, SGPPlugin
    from .compact import CompactReport, compact_activations, compact_report, uncompact_activations
    from .compressors import (METHODS, CalibrationError, CalibrationStatistics, Compressor,
                              register_method)
    from .core.budget import BudgetTooSmallError
    from .layers import LayerMode
    from .train_modes import preserved_train_modes
    from .units import format_bytes
    from .wrap import CompressionReport, calibrate, compress, report, select_layers, uncompress

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("layer_flops", "measure_activation_memory"), ".accounting"),
    "format_bytes": ".units",
    "Calibration": ".calibration",
    **dict.fromkeys(("CompactReport", "compact_activations", "compact_report",
                     "uncompact_activations"), ".compact"),
    **dict.fromkeys(("METHODS", "CalibrationError", "CalibrationStatistics", "Compressor",
                     "register_method"), ".compressors"),
    "LayerMode": ".layers",
    "preserved_train_modes": ".train_modes",
    "BudgetTooSmallError": ".core.budget",
    **dict.fromkeys(("CompressionReport", "calibrate", "compress", "report", "select_layers",
                     "uncompress"), ".wrap"),
    # the continual-learning plugins import Avalanche (slow, heavy)
    **dict.fromkeys(("LanceCLPlugin", "GPMPlugin", "SGPPlugin"), ".cl.plugins"),
}

__all__ = ["compress", "uncompress", "compact_activations", "uncompact_activations",
           "compact_report", "CompactReport", "calibrate", "report", "select_layers",
           "measure_activation_memory", "layer_flops", "format_bytes", "CompressionReport",
           "Calibration", "CalibrationError", "CalibrationStatistics", "LayerMode",
           "preserved_train_modes",
           "BudgetTooSmallError", "Compressor", "METHODS", "register_method", "__version__",
           "LanceCLPlugin", "GPMPlugin", "SGPPlugin"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lance_cl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value   # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
