"""`lance-cl run` / `lance-cl report` end to end through the console entry point on tiny runs
(the real naive recipe, watched by a counting plugin: tests/cl_stubs.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from lance_cl.cl.commands import add_report_parser, add_run_parser, parse_seeds
from lance_cl.cli import main

from cl_stubs import install


def _strict_json(path: Path) -> dict:
    def no_constants(name: str) -> None:
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)


def test_parse_seeds() -> None:
    assert parse_seeds("0") == [0]
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3-5") == [3, 4, 5]
    assert parse_seeds("0, 7-8") == [0, 7, 8]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_seeds("a")


def test_the_run_parser_defaults_name_things_that_exist() -> None:
    from lance_cl import strategies
    from lance_cl.benchmarks import get_benchmark

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_run_parser(sub)
    add_report_parser(sub)
    args = parser.parse_args(["run"])
    for name in args.strategies:
        strategies.parse_strategy(name)   # raises for an unknown recipe
    spec = get_benchmark(args.benchmark, quick=True)   # split_digits: bundled with scikit-learn
    assert len(spec.train_stream) >= 2 and args.seeds and callable(args.handler)
    args = parser.parse_args(["report", "somewhere", "--out", "x"])
    assert (args.dir, args.out) == ("somewhere", "x") and callable(args.handler)


def test_an_unknown_strategy_fails_before_anything_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    calls = install(monkeypatch)
    out = tmp_path / "runs"
    assert main(["run", "--strategies", "naive,foo", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "unknown strategy 'foo'" in capsys.readouterr().err
    assert calls.built == 0 and calls.train_calls == 0 and not out.exists()


def test_a_missing_data_set_is_reported_once_before_anything_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    calls = install(monkeypatch)
    out = tmp_path / "runs"
    status = main(["run", "--benchmark", "split_mnist", "--strategies", "naive,naive2", "--seeds", "0-1",
                   "--quick", "--data-root", str(tmp_path / "empty"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("MNIST") >= 1 and err.count("lance-cl run:") == 1
    assert str(tmp_path / "empty") in err
    assert calls.built == 0 and not out.exists()


def test_run_then_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    install(monkeypatch)
    threads = torch.get_num_threads()
    out = tmp_path / "runs"
    status = main(["run", "--strategies", "naive,naive2", "--seeds", "0-1", "--epochs", "1", "--quick",
                   "--out", str(out), "--no-progress", "--threads", "1"])
    assert status == 0
    assert torch.get_num_threads() == threads  # restored after the runs
    printed = capsys.readouterr().out
    assert "| split_digits | naive | 2 |" in printed and "| split_digits | naive2 | 2 |" in printed
    files = sorted(p.name for p in out.glob("*.json"))
    assert files == sorted(f"split_digits__{s}__seed{k}.json" for s in ("naive", "naive2") for k in (0, 1))
    for name in files:
        data = _strict_json(out / name)
        assert data["status"] == "complete" and data["config"]["epochs"] == 1
        assert len(data["accuracy_matrix"]) == 5 and all(len(r) == 5 for r in data["accuracy_matrix"])
        assert all(0.0 <= v <= 100.0 for r in data["accuracy_matrix"] for v in r)
        assert (out / "checkpoints" / name.replace(".json", ".pt")).is_file()

    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "| split_digits | naive2 | 2 |" in printed
    pngs = sorted((tmp_path / "rep").glob("*.png"))
    assert {p.name for p in pngs} == {
        "acc_vs_memory_split_digits.png", "acc_vs_peak_split_digits.png", "heatmap_split_digits__naive.png",
        "heatmap_split_digits__naive2.png", "task_accuracy_split_digits.png"}
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "## split_digits" in (tmp_path / "rep" / "report.md").read_text()


def test_unknown_benchmark_and_empty_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--benchmark", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "no complete run" in capsys.readouterr().err


def test_set_overrides_parse_and_reach_the_recorded_config(tmp_path: Path) -> None:
    import argparse

    from lance_cl.cl.commands import _override
    from lance_cl.cl.runner import run_experiment

    assert _override("train_energy=0.7") == ("train_energy", 0.7)
    assert _override('compact_batch_norm="bf16"') == ("compact_batch_norm", "bf16")
    assert _override("compact_batch_norm=bf16") == ("compact_batch_norm", "bf16")
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        _override("train_energy")
    r = run_experiment("split_digits", "lance", 0, out_dir=tmp_path, epochs=1, quick=True,
                       progress=False, max_tasks=1, overrides={"train_energy": 0.5})
    assert r["config"]["defaults"]["train_energy"] == 0.5
    assert r["per_task"][0]["layers"]["conv2"]["train_threshold"] == 0.5
