"""``lance-cl run`` and ``lance-cl report``: argparse sub-commands.

Wire them into a parser with ``add_run_parser(subparsers)`` / ``add_report_parser(subparsers)``;
each sets ``handler=fn`` with ``fn(args, argv=None) -> exit status`` (the convention of
``lance_cl.cli``). Importing this module is cheap (no torch, Avalanche or Ray): the handlers import
what they need, so ``lance-cl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["add_report_parser", "add_run_parser", "check_sweep", "cmd_report", "cmd_run", "parse_seeds",
           "unknown_benchmarks"]

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


def _names(text: str) -> list[str]:
    return [s.strip().lower().replace("-", "_") for s in text.split(",") if s.strip()]


def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--jobs expects a whole number >= 1, got {text!r}")
    return value


def _gpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 <= value <= 1 or (value > 1 and value == int(value))):
        raise argparse.ArgumentTypeError(
            f"--gpus-per-run expects a fraction in [0, 1] (e.g. 0.25: four runs per GPU) or a whole "
            f"number of GPUs, got {text!r}")
    return value


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
        help="continual-learning runs: every (benchmark, strategy, seed), then a table",
        description="Train each strategy task after task on each benchmark (task-incremental, "
                    "multi-head, GPM's protocol), test every task after each one and write one "
                    "JSON per (benchmark, strategy, seed) to --out, with checkpoints to resume. "
                    "Without arguments: split_digits (scikit-learn's bundled digits, offline) with "
                    f"{DEFAULT_STRATEGIES}, in about a minute on 2 CPU cores. --jobs N runs N at "
                    "a time on a local Ray instance, --ray-address on a Ray cluster "
                    "(docs/sweeps.md).",
    )
    p.add_argument("--benchmark", default="split_digits",
                   help="benchmark name, or several comma-separated (default: split_digits)")
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
    p.add_argument("--jobs", type=_jobs, default=None, metavar="N",
                   help="runs at a time (default 1: one after another in this process). N > 1 "
                        "starts a local Ray instance with N slots, each run with cores/N torch "
                        "threads unless --threads (or the benchmark) sets them; with --ray-address, "
                        "the most runs in flight on the cluster (default: no limit). Needs "
                        'pip install "lance-cl[ray]"')
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="run on this Ray cluster (e.g. HEAD_IP:6379 from `ray start --head`, or "
                        "'auto'); default: $RAY_ADDRESS when set. Each run is one task asking for "
                        "--threads CPUs (default 1); the driver writes the run files to --out")
    p.add_argument("--gpus-per-run", type=_gpus, default=0.0, metavar="F",
                   help="GPUs per run for Ray's scheduler, fractions share a GPU (0.5: two runs "
                        "per GPU); use with --device cuda (default: 0)")
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


def _failure(benchmark: str, strategy: str, seed: int, error: str, several: bool) -> str:
    where = f" ({benchmark})" if several else ""
    return f"{strategy} seed {seed}{where}: {error}"


def cmd_run(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    """Handler of ``run``: runs, then prints the aggregated table. 1 if any run failed, 2 for bad
    arguments (every benchmark and strategy is checked before anything trains)."""
    benchmarks = _names(args.benchmark)
    if not benchmarks:
        print(f"lance-cl run: no benchmark in --benchmark {args.benchmark!r}", file=sys.stderr)
        return 2
    jobs = getattr(args, "jobs", None)
    address = getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS") or None
    gpus_per_run = float(getattr(args, "gpus_per_run", 0.0) or 0.0)
    parallel = address is not None or (jobs or 1) > 1
    if gpus_per_run > 0 and not str(args.device).startswith("cuda"):
        print(f"lance-cl run: --gpus-per-run {gpus_per_run:g} needs --device cuda (Ray gives each "
              "run its GPU through CUDA_VISIBLE_DEVICES)", file=sys.stderr)
        return 2
    if gpus_per_run > 0 and not parallel:
        print("lance-cl run: --gpus-per-run is for Ray sweeps: add --jobs N or --ray-address",
              file=sys.stderr)
        return 2
    if getattr(args, "download", False):
        os.environ["LANCE_CL_DOWNLOAD"] = "1"  # read by lance_cl.benchmarks.get_benchmark
    local_ray = contextlib.ExitStack()
    if parallel and address is None:
        # started first: its workers import torch and Avalanche, and one of them checks the names
        # and data sets, while this process imports neither
        from . import sweep

        try:
            local_ray.enter_context(sweep.local_instance(jobs, gpus_per_run))
        except sweep.RayUnavailableError as exc:
            print(f"lance-cl run: {exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:   # no GPU for --gpus-per-run
            print(f"lance-cl run: Ray: {exc}", file=sys.stderr)
            return 1
    with local_ray:
        return _checked_run(args, benchmarks, jobs=jobs, address=address,
                            gpus_per_run=gpus_per_run, parallel=parallel)


def _checked_run(args: argparse.Namespace, benchmarks: list[str], *, jobs: Optional[int],
                 address: Optional[str], gpus_per_run: float, parallel: bool) -> int:
    """``run`` once its arguments are valid: benchmark and strategy names and the data checked,
    then the runs (in this process, or as Ray tasks when ``parallel``) and the table. Returns
    the exit status."""
    check = dict(compact=args.compact, data_root=args.data_root, quick=args.quick,
                 check_data=address is None)   # a cluster's nodes hold their own data sets
    if parallel and address is None:
        # on a worker of the local instance: the imports it needs happen where the runs will run
        from . import sweep

        if args.data_root is not None:
            check["data_root"] = sweep.anchored(args.data_root)
        names, error = sweep.call_on_worker(check_sweep, benchmarks, args.strategies, **check)
    else:
        names, error = check_sweep(benchmarks, args.strategies, **check)
    if error is not None:   # every strategy and data set is checked before anything trains
        print(f"lance-cl run: {error}", file=sys.stderr)
        return 2
    args.strategies = names
    options = dict(out_dir=args.out, epochs=args.epochs, data_root=args.data_root,
                   device=args.device, quick=args.quick, resume=not args.no_resume,
                   threads=args.threads, overrides=dict(args.overrides) or None)
    several = len(benchmarks) > 1
    start = time.perf_counter()
    if parallel:
        status = _run_on_ray(args, benchmarks, options, jobs=jobs, address=address,
                             gpus_per_run=gpus_per_run)
        if isinstance(status, int):
            return status
        results, failures = status
    else:
        from .runner import run_experiment

        results, failures = [], []
        for benchmark in benchmarks:
            for strategy in args.strategies:
                for seed in args.seeds:
                    try:
                        results.append(run_experiment(benchmark, strategy, seed,
                                                      progress=not args.no_progress, **options))
                    except KeyboardInterrupt:
                        print("\ninterrupted: finished tasks are saved; run the same command to "
                              "resume", file=sys.stderr)
                        return 130
                    except Exception as exc:  # keep going with the other runs
                        error = f"{type(exc).__name__}: {exc}"
                        failures.append(_failure(benchmark, strategy, seed, error, several))
                        print(f"lance-cl run: {strategy} seed {seed} failed: {error}", file=sys.stderr)
    from .report import aggregate, markdown_table

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


def unknown_benchmarks(benchmarks: Sequence[str]) -> Optional[str]:
    """The error message for the names in ``benchmarks`` that no benchmark is registered under,
    or None when there are none."""
    from lance_cl.benchmarks import available_benchmarks

    available = available_benchmarks()
    unknown = [b for b in benchmarks if b not in available]
    if not unknown:
        return None
    return f"unknown benchmark {', '.join(map(repr, unknown))}; available: {', '.join(available)}"


def check_sweep(benchmarks: Sequence[str], strategies: Sequence[str], *, compact: bool,
                data_root: Optional[str], quick: bool, check_data: bool = True
                ) -> tuple[Optional[list[str]], Optional[str]]:
    """Check a sweep before anything trains: every benchmark and strategy name, then
    (``check_data``) the data sets of every benchmark. Returns (the strategy names to run, with
    ``compact`` applied, None), or (None, the error message)."""
    from lance_cl import strategies as recipes

    error = unknown_benchmarks(benchmarks)
    if error is not None:
        return None, error
    try:
        for name in strategies:
            recipes.parse_strategy(name)
        names = [recipes.with_compaction(s) if compact else s for s in strategies]
    except ValueError as exc:
        return None, str(exc)
    if check_data:
        from lance_cl.data import DatasetNotFoundError

        from .runner import check_experiments

        try:
            for benchmark in benchmarks:
                check_experiments(benchmark, names, data_root=data_root, quick=quick)
        except DatasetNotFoundError as exc:
            return None, str(exc)
    return names, None


def _run_on_ray(args: argparse.Namespace, benchmarks: list[str], options: dict[str, Any], *,
                jobs: Optional[int], address: Optional[str], gpus_per_run: float
                ) -> "int | tuple[list[dict[str, Any]], list[str]]":
    """The runs as Ray tasks (lance_cl.cl.sweep): (results, failure lines), or an exit status."""
    from . import sweep

    try:
        sweep.import_ray()
    except sweep.RayUnavailableError as exc:
        print(f"lance-cl run: {exc}", file=sys.stderr)
        return 2
    runs = sweep.sweep_runs(benchmarks, args.strategies, args.seeds)
    where = f"the Ray cluster at {address}" if address else f"a local Ray instance ({jobs} slots)"
    print(f"lance-cl run: {len(runs)} run(s) on {where}", file=sys.stderr)
    try:
        outcome = sweep.run_sweep(runs, run_options=options, jobs=jobs, ray_address=address,
                                  gpus_per_run=gpus_per_run, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("\ninterrupted: finished tasks are saved; run the same command to resume",
              file=sys.stderr)
        return 130
    except (ConnectionError, RuntimeError) as exc:   # no cluster at the address, no GPU, ...
        print(f"lance-cl run: Ray: {exc}", file=sys.stderr)
        return 1
    several = len(benchmarks) > 1
    return outcome.results, [_failure(r.benchmark, r.strategy, r.seed, error, several)
                             for r, error in outcome.failures]


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

