"""lance-cl: memory-frugal training and continual learning with compressed activations.

Core API::

    report = lance_cl.compress(model, "lance", layers=4, example_inputs=x, eps=0.7)
    lance_cl.calibrate(model, loader, num_batches=100)   # or lance_cl.Calibration(model).run(...)
    stats = lance_cl.measure_activation_memory(model, x, loss_fn)
    lance_cl.uncompress(model)
    lance_cl.compact_activations(model)   # ReLU / dropout / max-pool / BatchNorm save compact forms

Continual learning: ``lance_cl.LanceCLPlugin`` (and the ``GPMPlugin`` / ``SGPPlugin`` baselines)
plug into any Avalanche strategy.
"""
from .accounting import format_bytes, layer_flops, measure_activation_memory
from .calibration import Calibration
from .compact import CompactReport, compact_activations, compact_report, uncompact_activations
from .compressors import (METHODS, CalibrationError, CalibrationStatistics, Compressor,
                          register_method)
from .layers import LayerMode
from .train_modes import preserved_train_modes
from .core.budget import BudgetTooSmallError
from .wrap import CompressionReport, calibrate, compress, report, select_layers, uncompress

__version__ = "0.1.0"

_CL_PLUGINS = ("LanceCLPlugin", "GPMPlugin", "SGPPlugin")


def __getattr__(name: str):
    # The continual-learning plugins import Avalanche (slow, heavy): load them on first use.
    if name in _CL_PLUGINS:
        from .cl import plugins
        return getattr(plugins, name)
    raise AttributeError(f"module 'lance_cl' has no attribute {name!r}")

__all__ = ["compress", "uncompress", "compact_activations", "uncompact_activations",
           "compact_report", "CompactReport", "calibrate", "report", "select_layers",
           "measure_activation_memory", "layer_flops", "format_bytes", "CompressionReport",
           "Calibration", "CalibrationError", "CalibrationStatistics", "LayerMode",
           "preserved_train_modes",
           "BudgetTooSmallError", "Compressor", "METHODS", "register_method", "__version__",
           "LanceCLPlugin", "GPMPlugin", "SGPPlugin"]
