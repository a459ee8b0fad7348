"""Continual learning: the GPM protocol as Avalanche pieces, metrics, the runner and reports.

The names below load their module on first use, so importing a submodule that needs no
Avalanche (``lance_cl.cl.commands``, ``lance_cl.cl.metrics``) does not import it."""

from importlib import import_module
from typing import Any

_SOURCES = {
    "average_accuracy": "metrics", "backward_transfer": "metrics", "forgetting": "metrics",
    "learning_accuracy": "metrics", "summary": "metrics",
    "GPMSchedulePlugin": "protocol", "evaluate_accuracy": "protocol",
    "split_validation": "protocol", "with_validation": "protocol",
    "aggregate": "report", "load_runs": "report", "markdown_table": "report", "write_report": "report",
    "ActivationMemoryProbe": "runner", "run_experiment": "runner",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name in _SOURCES:
        return getattr(import_module(f".{_SOURCES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
