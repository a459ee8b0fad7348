"""Reports from saved run files: seed aggregation, a Markdown table and PNG plots.

``write_report(dir)`` reads every ``*.json`` results file that :func:`lance_cl.cl.runner.run_experiment`
wrote in ``dir``, aggregates seeds per (benchmark, strategy) as mean +- std (sample standard
deviation, ddof=1; 0 for a single seed) and writes ``report.md`` plus, per benchmark:

- ``heatmap_<benchmark>__<strategy>.png``: mean accuracy matrix R[i, j] (i >= j shown);
- ``acc_vs_memory_<benchmark>.png``: ACC against activation memory of one training step
  (whole step, and the inputs of the conv / linear body layers), error bars over seeds;
- ``acc_vs_peak_<benchmark>.png``: ACC against the measured peak memory of one training step
  (forward + backward, gradients and temporaries included), error bars over seeds; only for
  benchmarks whose runs have that figure (older run files lack it: "-" in the table);
- ``task_accuracy_<benchmark>.png``: accuracy of every task after each training task.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..units import format_bytes

__all__ = [
    "METRICS",
    "aggregate",
    "format_bytes",
    "load_runs",
    "markdown_table",
    "write_report",
]

# key in the row -> (where it lives in a results JSON, column title, kind)
METRICS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "acc": (("acc",), "ACC (%)", "pct"),
    "bwt": (("bwt",), "BWT (%)", "pct"),
    "forgetting": (("forgetting",), "Forgetting (%)", "pct"),
    "learning_accuracy": (("learning_accuracy",), "LA (%)", "pct"),
    "activation_total_bytes": (("memory", "activation_total_bytes"), "Act. mem./step", "bytes"),
    "activation_layers_bytes": (("memory", "activation_layers_bytes"), "Act. mem. conv/linear inputs", "bytes"),
    "peak_step_bytes": (("memory", "peak_step_bytes"), "Peak step mem.", "bytes"),
    "persistent_bytes": (("memory", "persistent_bytes"), "CL state", "bytes"),
    "training_extra_bytes": (("memory", "training_extra_bytes"), "Extra while training", "bytes"),
    "train_time_s": (("train_time_s",), "Train time (s)", "time"),
}


def load_runs(directory: Union[str, Path], *, include_incomplete: bool = False) -> list[dict[str, Any]]:
    """Every results JSON in ``directory`` (not recursive), sorted by file name.

    Files that are not run results are skipped; so are unfinished runs unless
    ``include_incomplete``. Each dict gets ``"_path"``.
    """
    runs = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "accuracy_matrix" not in data or "config" not in data:
            continue
        if data.get("status") != "complete" and not include_incomplete:
            continue
        data["_path"] = str(path)
        runs.append(data)
    return runs


def _get(run: dict[str, Any], path: Sequence[str]) -> Optional[float]:
    cur: Any = run
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    if cur is None:
        return None
    value = float(cur)
    return value if math.isfinite(value) else None


def _mean_std(values: Sequence[float]) -> dict[str, Optional[float]]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    a = np.asarray(values, dtype=np.float64)
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {"mean": float(a.mean()), "std": std, "n": len(a)}


def aggregate(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (benchmark, strategy), in order of first appearance.

    Row keys: ``benchmark``, ``strategy``, ``seeds`` (sorted), ``n_seeds``, one
    ``{"mean", "std", "n"}`` dict per key of :data:`METRICS`, ``accuracy_matrix`` (element-wise
    mean over seeds of the rows every seed finished, list of lists) and ``n_tasks``.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        cfg = run.get("config", {})
        groups.setdefault((str(cfg.get("benchmark")), str(cfg.get("strategy"))), []).append(run)
    rows = []
    for (bench, strat), members in groups.items():
        row: dict[str, Any] = {
            "benchmark": bench,
            "strategy": strat,
            "seeds": sorted(int(m["config"].get("seed", 0)) for m in members),
            "n_seeds": len(members),
            "n_tasks": max(int(m.get("n_tasks", len(m["accuracy_matrix"]))) for m in members),
        }
        for key, (path, _, _) in METRICS.items():
            row[key] = _mean_std([v for v in (_get(m, path) for m in members) if v is not None])
        mats = [np.asarray(m["accuracy_matrix"], dtype=np.float64) for m in members if m["accuracy_matrix"]]
        if mats:
            k = min(a.shape[0] for a in mats)
            row["accuracy_matrix"] = np.mean([a[:k] for a in mats], axis=0).tolist()
        else:
            row["accuracy_matrix"] = []
        rows.append(row)
    return rows


def _cell(stat: dict[str, Any], kind: str) -> str:
    if stat.get("mean") is None:
        return "-"
    m, s = stat["mean"], stat["std"]
    if kind == "bytes":
        return format_bytes(m) + (f" ± {format_bytes(s)}" if s else "")
    if kind == "time":
        return f"{m:.1f} ± {s:.1f}"
    return f"{m:.2f} ± {s:.2f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """GitHub Markdown table: one line per row of :func:`aggregate`, mean ± std over seeds."""
    head = ["Benchmark", "Strategy", "Seeds"] + [title for _, title, _ in METRICS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(METRICS)) + "|"]
    for row in rows:
        cells = [row["benchmark"], row["strategy"], str(row["n_seeds"])]
        cells += [_cell(row[key], kind) for key, (_, _, kind) in METRICS.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- plots ------------------------------------------------------------------------------------------


def _figure(width: float, height: float):  # type: ignore[no-untyped-def]
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _heatmap(row: dict[str, Any], path: Path) -> Path:
    R = np.asarray(row["accuracy_matrix"], dtype=np.float64)
    k, T = R.shape
    shown = np.full((k, T), np.nan)
    for i in range(k):
        shown[i, : i + 1] = R[i, : i + 1]
    fig = _figure(max(4.0, 1.6 + 0.55 * T), max(3.4, 1.4 + 0.5 * k))
    ax = fig.add_subplot()
    im = ax.imshow(shown, vmin=0, vmax=100, cmap="viridis")
    for i in range(k):
        for j in range(i + 1):
            v = shown[i, j]
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if v < 60 else "black")
    ax.set_xticks(range(T), [str(j + 1) for j in range(T)])
    ax.set_yticks(range(k), [str(i + 1) for i in range(k)])
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    ax.set_title(f"{row['strategy']} on {row['benchmark']}\nR[i, j] (%), mean of {row['n_seeds']} seed(s)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path)
    return path


def _byte_unit(rows: Sequence[dict[str, Any]], key: str) -> tuple[str, int]:
    """Axis unit for the largest mean of ``key`` over ``rows``: ("MiB", 2**20), ("KiB", 1024), ("B", 1)."""
    biggest = max(((r[key]["mean"] or 0.0) for r in rows), default=0.0)
    return next(((u, f) for u, f in (("MiB", 2**20), ("KiB", 2**10)) if biggest >= f), ("B", 1))


def _acc_panel(ax: Any, rows: Sequence[dict[str, Any]], key: str, label: str, unit: str,
               scale: float) -> None:
    """ACC (y) against ``key`` (x, bytes / ``scale``), mean ± std over seeds, one point per strategy."""
    for row in rows:
        x, y = row[key], row["acc"]
        if x.get("mean") is None or y.get("mean") is None:
            continue
        ax.errorbar(x["mean"] / scale, y["mean"], xerr=x["std"] / scale, yerr=y["std"],
                    fmt="o", capsize=3, label=row["strategy"])
        ax.annotate(row["strategy"], (x["mean"] / scale, y["mean"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    right = max(((r[key]["mean"] or 0.0) + (r[key]["std"] or 0.0)) / scale for r in rows)
    ax.set_xlim(0, 1.25 * right if right > 0 else 1.0)
    ax.margins(y=0.15)
    ax.set_xlabel(f"{label} ({unit})", fontsize=8)
    ax.set_ylabel("ACC (%)")
    ax.grid(alpha=0.3)


def _acc_vs_memory(bench: str, rows: Sequence[dict[str, Any]], path: Path) -> Path:
    fig = _figure(9.0, 3.8)
    unit, scale = _byte_unit(rows, "activation_total_bytes")
    panels = [("activation_total_bytes", "activation memory of one step (whole model)"),
              ("activation_layers_bytes", "activation memory: conv/linear inputs")]
    for idx, (key, label) in enumerate(panels):
        _acc_panel(fig.add_subplot(1, 2, idx + 1), rows, key, label, unit, scale)
    fig.suptitle(f"{bench}: accuracy vs activation memory (mean ± std over seeds)", fontsize=10)
    fig.savefig(path)
    return path


def _acc_vs_peak(bench: str, rows: Sequence[dict[str, Any]], path: Path) -> Path:
    fig = _figure(5.0, 3.8)
    unit, scale = _byte_unit(rows, "peak_step_bytes")
    _acc_panel(fig.add_subplot(), rows, "peak_step_bytes",
               "peak memory of one step (forward + backward)", unit, scale)
    fig.suptitle(f"{bench}: accuracy vs peak step memory\n(mean ± std over seeds)", fontsize=10)
    fig.savefig(path)
    return path


def _task_accuracy(bench: str, rows: Sequence[dict[str, Any]], path: Path) -> Path:
    n = len(rows)
    cols = min(n, 4)
    nrows = math.ceil(n / cols)
    fig = _figure(3.2 * cols, 2.8 * nrows)
    for idx, row in enumerate(rows):
        ax = fig.add_subplot(nrows, cols, idx + 1)
        R = np.asarray(row["accuracy_matrix"], dtype=np.float64)
        k = R.shape[0] if R.size else 0
        for j in range(min(k, R.shape[1] if R.size else 0)):
            xs = list(range(j + 1, k + 1))
            ax.plot(xs, R[j:k, j], marker="o", markersize=3, label=f"task {j + 1}")
        ax.set_title(row["strategy"], fontsize=9)
        ax.set_xlabel("after training task", fontsize=8)
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        if idx == 0 and k:
            ax.legend(fontsize=6, loc="lower left")
    fig.suptitle(f"{bench}: accuracy of each task over time (mean over seeds)", fontsize=10)
    fig.savefig(path)
    return path


def write_report(directory: Union[str, Path], out_dir: Optional[Union[str, Path]] = None) -> list[Path]:
    """Write ``report.md`` and the PNG plots for the complete runs in ``directory``.

    Returns the written paths (report.md first). ``out_dir`` defaults to ``directory``.
    Raises FileNotFoundError when ``directory`` has no complete run.
    """
    directory = Path(directory)
    out = Path(out_dir) if out_dir is not None else directory
    runs = load_runs(directory)
    if not runs:
        raise FileNotFoundError(f"no complete run results (*.json) in {directory}")
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(runs)
    written: list[Path] = []
    sections = ["# lance-cl report", "",
                f"{len(runs)} run(s) from `{directory}`. Mean ± std (sample, ddof=1) over seeds. "
                "Accuracies in %; ACC = mean final accuracy, BWT = mean (final - just learned), "
                "forgetting = mean (best earlier - final), LA = mean accuracy right after learning. "
                "Activation memory: bytes autograd saves in one training step (peak over tasks), for "
                "the whole model and for the inputs of the conv/linear body layers; peak step mem.: "
                "the most bytes allocated at once during one step (forward + backward: activations, "
                "gradients, temporaries) above its start, peak over tasks; CL state: "
                "persistent bytes after the last task; extra while training: peak over tasks.", ""]
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        brows = [r for r in rows if r["benchmark"] == bench]
        sections += [f"## {bench}", "", markdown_table(brows)]
        figs = []
        for row in brows:
            if row["accuracy_matrix"]:
                figs.append(_heatmap(row, out / f"heatmap_{bench}__{row['strategy']}.png"))
        summary = [_acc_vs_memory(bench, brows, out / f"acc_vs_memory_{bench}.png")]
        if any(r["peak_step_bytes"]["mean"] is not None for r in brows):
            summary.append(_acc_vs_peak(bench, brows, out / f"acc_vs_peak_{bench}.png"))
        summary.append(_task_accuracy(bench, brows, out / f"task_accuracy_{bench}.png"))
        written += figs + summary
        sections += [f"![{p.stem}]({p.name})" for p in summary]
        sections += [""] + [f"![{p.stem}]({p.name})" for p in figs] + [""]
    report = out / "report.md"
    report.write_text("\n".join(sections), encoding="utf-8")
    return [report, *written]
