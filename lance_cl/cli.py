"""The ``lance-cl`` command: ``bench`` (activation memory, step time and gradient fidelity of every
compression method against vanilla), and the planned ``run`` / ``report`` commands."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

PLANNED = "not implemented yet: planned (continual-learning issue)"


def _planned(name: str):
    def handler(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
        print(f"lance-cl {name}: {PLANNED}", file=sys.stderr)
        return 2
    return handler


def _bench(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    from lance_cl.benchmarks import perf  # heavy imports only when benchmarking

    return perf.main(args, argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lance-cl",
        description="Memory-frugal training with compressed activations, and continual learning on "
                    "top of Avalanche.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from lance_cl.benchmarks import perf

    bench = sub.add_parser(
        "bench", help="activation memory, step time and gradient fidelity: every method vs vanilla",
        description="Measure every compression method against vanilla autograd on AlexNet-5 and a "
                    "MobileNetV2-style network with real FashionMNIST images: activation bytes "
                    "(compressed layers and whole step), step time, gradient fidelity, ranks and "
                    "FLOPs. Writes bench.json and bench.md to --out and prints the table.")
    perf.add_arguments(bench)
    bench.set_defaults(handler=_bench)

    run = sub.add_parser("run", help=f"continual-learning runs ({PLANNED})",
                         description=f"Continual-learning benchmark runs: {PLANNED}.")
    run.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    run.set_defaults(handler=_planned("run"))

    report = sub.add_parser("report", help=f"comparison tables and plots from run files ({PLANNED})",
                            description=f"Reports from saved run files: {PLANNED}.")
    report.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    report.set_defaults(handler=_planned("report"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lance-cl`` console script. Returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(args_list)
    return int(args.handler(args, args_list) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
