"""The ``lance-cl`` command: ``bench`` (activation memory, step time and gradient fidelity of every
compression method against vanilla), ``run`` (continual-learning benchmark runs), ``report``
(tables and plots from saved runs) and ``finetune`` (fine-tuning the last layers of a pretrained
backbone with each method)."""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence


def _bench(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    from lance_cl.benchmarks import perf  # heavy imports only when benchmarking

    return perf.main(args, argv)


COMMANDS = ("bench", "run", "report", "finetune")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``lance-cl`` parser. ``command`` (one of :data:`COMMANDS`): the one sub-command the
    arguments name; the others then get no options, which spares ``run`` and ``report`` the bench's
    imports (torch and the method registry: a sweep's driver does not import torch)."""
    parser = argparse.ArgumentParser(
        prog="lance-cl",
        description="Memory-frugal training with compressed activations, and continual learning on "
                    "top of Avalanche.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    bench = sub.add_parser(
        "bench", help="activation memory, step time and gradient fidelity: every method vs vanilla",
        description="Measure every compression method against vanilla autograd on AlexNet-5 and a "
                    "MobileNetV2-style network with real FashionMNIST images: activation bytes "
                    "(compressed layers and whole step), step time, gradient fidelity, ranks and "
                    "FLOPs. Writes bench.json and bench.md to --out and prints the table.",
        epilog="Exit status: 0 when every method was measured; 1 when the data is missing or a "
               "method failed (its table row says why; the others are still measured). "
               "See docs/performance.md for the protocol and the reference figures.")
    if command in (None, "bench"):
        from lance_cl.benchmarks import perf

        perf.add_arguments(bench)
    bench.set_defaults(handler=_bench)

    from lance_cl.cl.commands import add_report_parser, add_run_parser

    add_run_parser(sub)
    add_report_parser(sub)

    from lance_cl.finetune.command import add_finetune_parser  # standard library only

    add_finetune_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lance-cl`` console script. Returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(args_list)
    # Avalanche imports qpsolvers, which warns that no QP solver is installed; only GEM needs
    # one, and no lance-cl command uses GEM
    warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
    return int(args.handler(args, args_list) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
