"""``lance-cl run`` and ``lance-cl report``: argparse sub-commands.

Wire them into a parser with ``add_run_parser(subparsers)`` / ``add_report_parser(subparsers)``;
each sets ``handler=fn`` with ``fn(args, argv=None) -> exit status`` (the convention of
``lance_cl.cli``). :func:`main` is a stand-alone parser with just these two commands.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["add_report_parser", "add_run_parser", "cmd_report", "cmd_run", "main", "parse_seeds"]

DEFAULT_STRATEGIES = "lance,gpm,sgp,naive"


def parse_seeds(text: str) -> list[int]:
    """'0' -> [0]; '0,1,2' -> [0, 1, 2]; '0-2' -> [0, 1, 2]; mixes allowed ('0,3-4')."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        span = re.fullmatch(r"(\d+)-(\d+)", part)
        try:
            seeds.extend(range(int(span[1]), int(span[2]) + 1) if span else [int(part)])
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad seed {part!r} in {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seed in {text!r}")
    return seeds


def _strategies(text: str) -> list[str]:
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no strategy given")
    return names


def _override(text: str) -> tuple[str, Any]:
    """'train_energy=0.7' -> ('train_energy', 0.7); a value that is not JSON stays a string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def add_run_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``run``: every (strategy, seed) on one benchmark, then the comparison table."""
    p = subparsers.add_parser(
        "run",
        help="continual-learning runs: every (strategy, seed) on one benchmark, then a table",
        description="Train each strategy task after task on a benchmark (task-incremental, "
                    "multi-head, GPM's protocol), test every task after each one and write one "
                    "JSON per (benchmark, strategy, seed) to --out, with checkpoints to resume. "
                    "Without arguments: split_digits (scikit-learn's bundled digits, offline) with "
                    f"{DEFAULT_STRATEGIES}, in about a minute on 2 CPU cores.",
    )
    p.add_argument("--benchmark", default="split_digits",
                   help="benchmark name (default: split_digits)")
    p.add_argument("--strategies", type=_strategies, default=_strategies(DEFAULT_STRATEGIES),
                   help=f"comma-separated strategy names (default: {DEFAULT_STRATEGIES})")
    p.add_argument("--seeds", type=parse_seeds, default=[0],
                   help="seeds: '0', '0,1,2' or '0-2' (default: 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help="maximum epochs per task (default: the benchmark's)")
    p.add_argument("--data-root", default=None,
                   help="where data sets live (default: $LANCE_CL_DATA, ../shared/data or ~/.lance_cl/data)")
    p.add_argument("--out", default="runs", help="output directory (default: runs/)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--quick", action="store_true", help="small subset and few epochs (smoke test)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download missing CIFAR / MNIST / SVHN files into --data-root "
                        "(needs the network; MiniImageNet and notMNIST are placed by hand, see "
                        "docs/benchmarks.md). Same as LANCE_CL_DOWNLOAD=1")
    p.add_argument("--no-resume", action="store_true",
                   help="start every run from scratch (default: skip complete runs, resume checkpoints)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the benchmark's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--set", dest="overrides", action="append", type=_override, default=[],
                   metavar="KEY=VALUE",
                   help="override one benchmark default (a JSON value, else a string), e.g. --set "
                        "train_energy=0.7 --set compact_batch_norm=bf16; repeatable; recorded in "
                        "each run's config")
    p.add_argument("--compact", action="store_true",
                   help="run every strategy with compact saved tensors for ReLU, dropout, max-pool "
                        "and BatchNorm (exact gradients); recipes that do not compact by default "
                        "get a '+compact' suffix (e.g. gpm+compact). The lance recipes compact by "
                        "default; 'lance+plain' turns it off.")
    p.set_defaults(handler=cmd_run)
    return p


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report``: aggregate the run files of a directory into report.md and PNG plots."""
    p = subparsers.add_parser(
        "report",
        help="comparison table (mean ± std over seeds) and plots from saved run files",
        description="Aggregate the run JSONs in DIR over seeds into report.md (Markdown table) "
                    "and PNG plots: accuracy-matrix heatmaps, ACC vs activation memory, accuracy "
                    "of each task over time.",
    )
    p.add_argument("dir", help="directory with the run JSONs (lance-cl run --out)")
    p.add_argument("--out", default=None, help="where to write the report (default: DIR)")
    p.set_defaults(handler=cmd_report)
    return p


def cmd_run(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    """Handler of ``run``: runs, then prints the aggregated table. 1 if any run failed."""
    from lance_cl.benchmarks import available_benchmarks

    from .report import aggregate, markdown_table
    from .runner import run_experiment

    if args.benchmark.lower().replace("-", "_") not in available_benchmarks():
        print(f"lance-cl run: unknown benchmark {args.benchmark!r}; available: "
              f"{', '.join(available_benchmarks())}", file=sys.stderr)
        return 2
    if getattr(args, "download", False):
        os.environ["LANCE_CL_DOWNLOAD"] = "1"  # read by lance_cl.benchmarks.get_benchmark
    from lance_cl import strategies as recipes

    try:
        for name in args.strategies:
            recipes.parse_strategy(name)
        names = [recipes.with_compaction(s) if args.compact else s
                 for s in args.strategies]
    except ValueError as exc:   # every strategy is checked before anything trains
        print(f"lance-cl run: {exc}", file=sys.stderr)
        return 2
    args.strategies = names
    results, failures = [], []
    start = time.perf_counter()
    for strategy in args.strategies:
        for seed in args.seeds:
            try:
                results.append(run_experiment(
                    args.benchmark, strategy, seed, out_dir=args.out, epochs=args.epochs,
                    data_root=args.data_root, device=args.device, quick=args.quick,
                    resume=not args.no_resume, progress=not args.no_progress, threads=args.threads,
                    overrides=dict(args.overrides) or None,
                ))
            except KeyboardInterrupt:
                print("\ninterrupted: finished tasks are saved; run the same command to resume",
                      file=sys.stderr)
                return 130
            except Exception as exc:  # keep going with the other runs
                failures.append(f"{strategy} seed {seed}: {type(exc).__name__}: {exc}")
                print(f"lance-cl run: {strategy} seed {seed} failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
    done = [r for r in results if r.get("status") == "complete"]
    if done:
        print()
        print(markdown_table(aggregate(done)), end="")
    print(f"\n{len(done)} run(s) complete in {time.perf_counter() - start:.1f} s; results in "
          f"{args.out}/ (plots: lance-cl report {args.out})")
    if failures:
        print("failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    """Handler of ``report``: writes report.md and the plots, prints the table and the paths."""
    from .report import aggregate, load_runs, markdown_table, write_report

    try:
        paths = write_report(args.dir, args.out)
    except FileNotFoundError as exc:
        print(f"lance-cl report: {exc}", file=sys.stderr)
        return 1
    print(markdown_table(aggregate(load_runs(args.dir))), end="")
    print("\nwrote:\n  " + "\n  ".join(str(p) for p in paths))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point with just ``run`` and ``report`` (``lance_cl.cli`` wires both)."""
    parser = argparse.ArgumentParser(prog="lance-cl")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_run_parser(sub)
    add_report_parser(sub)
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_list)
    return int(args.handler(args, args_list) or 0)
