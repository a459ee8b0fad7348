"""Continual learning: the GPM protocol as Avalanche pieces, metrics, the runner and reports."""

from .metrics import average_accuracy, backward_transfer, forgetting, learning_accuracy, summary
from .protocol import GPMSchedulePlugin, evaluate_accuracy, split_validation, with_validation
from .report import aggregate, load_runs, markdown_table, write_report
from .runner import ActivationMemoryProbe, run_experiment

__all__ = [
    "ActivationMemoryProbe",
    "GPMSchedulePlugin",
    "aggregate",
    "average_accuracy",
    "backward_transfer",
    "evaluate_accuracy",
    "forgetting",
    "learning_accuracy",
    "load_runs",
    "markdown_table",
    "run_experiment",
    "split_validation",
    "summary",
    "with_validation",
    "write_report",
]
