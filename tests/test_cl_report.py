"""Seed aggregation against hand-computed mean / std, the Markdown table and the PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lance_cl.cl.report import aggregate, format_bytes, load_runs, markdown_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(strategy: str, seed: int, acc: float, bwt: float, act: int, R: list, status: str = "complete",
         peak: int | None = None) -> dict:
    run = {
        "format": "lance-cl-run/1",
        "config": {"benchmark": "toy", "strategy": strategy, "seed": seed},
        "status": status,
        "n_tasks": 2,
        "completed_tasks": len(R),
        "accuracy_matrix": R,
        "acc": acc,
        "bwt": bwt,
        "forgetting": -bwt,
        "learning_accuracy": acc - bwt / 2,
        "memory": {
            "activation_total_bytes": act,
            "activation_layers_bytes": act // 10,
            "persistent_bytes": 4096,
            "training_extra_bytes": 0,
        },
        "train_time_s": 10.0 + seed,
    }
    if peak is not None:  # run files written before the peak step memory existed lack the key
        run["memory"]["peak_step_bytes"] = peak
    return run


def _write(d: Path) -> None:
    runs = [
        _run("x", 0, 70.0, -1.0, 1000, [[90.0, 10.0], [80.0, 95.0]]),
        _run("x", 1, 72.0, -2.0, 1000, [[100.0, 20.0], [70.0, 85.0]]),
        _run("x", 2, 74.0, -3.0, 1300, [[95.0, 30.0], [60.0, 90.0]]),
        _run("y", 0, 60.0, -10.0, 4096, [[50.0, 50.0], [40.0, 80.0]]),
        _run("y", 1, 99.0, 0.0, 1, [[1.0, 1.0]], status="running"),  # unfinished: skipped
    ]
    for r in runs:
        c = r["config"]
        (d / f"toy__{c['strategy']}__seed{c['seed']}.json").write_text(json.dumps(r))
    (d / "notes.json").write_text(json.dumps({"hello": 1}))  # not a run file


def test_aggregate_mean_std_by_hand(tmp_path: Path) -> None:
    _write(tmp_path)
    runs = load_runs(tmp_path)
    assert len(runs) == 4
    rows = aggregate(runs)
    assert [(r["strategy"], r["seeds"]) for r in rows] == [("x", [0, 1, 2]), ("y", [0])]
    x, y = rows
    # ACC 70, 72, 74: mean 72, sample std sqrt((4 + 0 + 4) / 2) = 2
    assert x["acc"]["mean"] == pytest.approx(72.0) and x["acc"]["std"] == pytest.approx(2.0)
    # BWT -1, -2, -3: mean -2, std sqrt((1 + 0 + 1) / 2) = 1
    assert x["bwt"]["mean"] == pytest.approx(-2.0) and x["bwt"]["std"] == pytest.approx(1.0)
    # activation bytes 1000, 1000, 1300: mean 1100, std sqrt((100^2 + 100^2 + 200^2) / 2)
    assert x["activation_total_bytes"]["mean"] == pytest.approx(1100.0)
    assert x["activation_total_bytes"]["std"] == pytest.approx(math.sqrt(30000.0))
    assert x["train_time_s"]["mean"] == pytest.approx(11.0)
    # element-wise mean accuracy matrix
    np.testing.assert_allclose(x["accuracy_matrix"], [[95.0, 20.0], [70.0, 90.0]])
    # one seed: std 0
    assert y["acc"] == {"mean": 60.0, "std": 0.0, "n": 1}
    assert len(load_runs(tmp_path, include_incomplete=True)) == 5

    table = markdown_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| Benchmark | Strategy | Seeds | ACC (%)")
    assert "| toy | x | 3 | 72.00 ± 2.00 | -2.00 ± 1.00 | 2.00 ± 1.00 |" in table
    assert format_bytes(1100) + " ± " + format_bytes(math.sqrt(30000.0)) == "1.07 KiB ± 173 B"
    assert "1.07 KiB ± 173 B" in lines[2]
    assert "| toy | y | 1 | 60.00 ± 0.00 |" in table and "4.00 KiB" in lines[3]


def _assert_png(path: Path) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, (path, len(data))
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_write_report_files(tmp_path: Path) -> None:
    _write(tmp_path)
    out = tmp_path / "report"
    paths = write_report(tmp_path, out)
    names = sorted(p.name for p in paths)
    assert names == sorted([
        "report.md", "heatmap_toy__x.png", "heatmap_toy__y.png", "acc_vs_memory_toy.png",
        "task_accuracy_toy.png",
    ])
    for p in paths:
        assert p.parent == out and p.is_file()
        if p.suffix == ".png":
            _assert_png(p)
    md = (out / "report.md").read_text()
    assert "## toy" in md and "72.00 ± 2.00" in md and "![acc_vs_memory_toy](acc_vs_memory_toy.png)" in md
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "report")  # no run files there


def test_peak_step_memory_column_and_plot(tmp_path: Path) -> None:
    runs = [_run("x", 0, 70.0, -1.0, 1000, [[90.0, 10.0], [80.0, 95.0]], peak=2 * 2**20),
            _run("x", 1, 72.0, -2.0, 1000, [[100.0, 20.0], [70.0, 85.0]], peak=4 * 2**20),
            _run("y", 0, 60.0, -10.0, 4096, [[50.0, 50.0], [40.0, 80.0]])]  # old file: no key
    for r in runs:
        c = r["config"]
        (tmp_path / f"toy__{c['strategy']}__seed{c['seed']}.json").write_text(json.dumps(r))
    x, y = aggregate(load_runs(tmp_path))
    # 2 and 4 MiB: mean 3 MiB, sample std sqrt(2) MiB
    assert x["peak_step_bytes"]["mean"] == pytest.approx(3 * 2**20)
    assert x["peak_step_bytes"]["std"] == pytest.approx(math.sqrt(2) * 2**20)
    assert y["peak_step_bytes"]["mean"] is None
    head, _, row_x, row_y = markdown_table([x, y]).strip().splitlines()
    col = head.split(" | ").index("Peak step mem.")
    assert row_x.split(" | ")[col] == "3.00 MiB ± 1.41 MiB" and row_y.split(" | ")[col] == "-"
    paths = write_report(tmp_path, tmp_path / "r")
    plot = tmp_path / "r" / "acc_vs_peak_toy.png"
    assert plot in paths
    _assert_png(plot)
    assert "![acc_vs_peak_toy](acc_vs_peak_toy.png)" in (tmp_path / "r" / "report.md").read_text()
