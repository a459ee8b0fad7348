"""Performance suite behind ``lance-cl bench``: every compression method against vanilla autograd.

For each model (GPM's AlexNet-5, a MobileNetV2-style stack) on real FashionMNIST images padded to
32x32x3, and each registered method (vanilla, lance, asi, hosvd, gradient_filter, and any method
registered with :func:`lance_cl.register_method`), in one process and on the
same weights and the same batch:

* activation memory of one training step, measured with saved-tensor hooks
  (:func:`lance_cl.measure_activation_memory`): over the compressed layers (``selected``) and for
  the whole step (``total``: BatchNorm, ReLU, pooling, dropout included), with vanilla / method
  ratios; the analytic bytes from the ranks are reported next to the measured ones;
* peak memory of that step (``peak_step``, same pass): the most bytes allocated at once during
  forward + backward above the step's start (activations, gradients incl. the parameters'
  ``.grad``, every temporary of the compression code), from the PyTorch profiler's allocation
  events on CPU and the allocator statistics on CUDA, with the vanilla / method ratio;
* step time (zero_grad, forward, loss, backward): median over repeats after warm-up, methods
  interleaved round-robin so slow drift of the machine hits every method alike;
* gradient fidelity: cosine and angle between each compressed layer's weight gradient and plain
  autograd's on the same batch and weights (dropout off, BatchNorm on batch statistics);
* the ranks chosen and the analytic FLOPs of one step over the compressed layers
  (:func:`lance_cl.layer_flops`).

Protocol (documented in docs/performance.md):

* weights are "trained-ish": the plain model is trained for a few dozen SGD steps (lr 0.01, batch
  ``batch_size``, seed fixed) on real images before anything is measured, then deep-copied for
  every method;
* layers compressed: AlexNet-5 -> conv1, conv2, conv3, fc1, fc2 (every trained layer but the task
  head); MobileNetV2Blocks -> every conv of the inverted-residual blocks (1x1 expand, 3x3
  depthwise, 1x1 project), not the stem (its input is the data batch, which a training loop holds
  anyway) nor the classifier head. gradient_filter is defined for Conv2d only, so it compresses
  the convolutions of that set and its ratios are taken against vanilla over the same convs;
* the images are split into disjoint slices: the measured batch (the last ``batch_size`` images),
  the calibration batches just before it (lance: 8 batches, asi: 1), and the training images
  (the rest, cycled).

Usage: ``lance-cl bench [--quick] [--out DIR] ...`` or :func:`run_bench` from Python.

The suite is four modules: :mod:`.perf_config` (configuration and the methods, read from the
method registry), :mod:`.perf_data` (images and their slices), :mod:`.perf_measure` (training,
measurements, :func:`run_bench`) and :mod:`.perf_output` (tables and files); this module is the
command line.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, Callable, Optional, Sequence

from .perf_config import (COMPACT_VARIANTS, MODELS, BenchConfig, BenchDataError, BenchSetupError,
                          bench_methods, default_methods, split_variant)
from .perf_data import load_bench_data
from .perf_measure import run_bench
from .perf_output import failures, render_markdown, write_outputs

__all__ = ["BenchConfig", "BenchDataError", "BenchSetupError", "MODELS", "COMPACT_VARIANTS",
           "bench_methods", "default_methods", "split_variant", "add_arguments", "config_from_args",
           "failures", "load_bench_data", "main", "render_markdown", "run_bench", "write_outputs"]


def _csv(kind: str, allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(bad) or '(none given)'}; choose from {', '.join(allowed)}")
        return items
    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lance-cl bench`` (the method list is the registry's at call time)."""
    methods, defaults = bench_methods(), default_methods()
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and training steps (under a minute on 2 CPU cores)")
    parser.add_argument("--out", default="bench_out", help="output folder for bench.json and bench.md "
                        "(default: bench_out/)")
    parser.add_argument("--data-root", default=None,
                        help="folder containing FashionMNIST/raw/ (default: $LANCE_CL_DATA, the "
                             "checkout's ../shared/data, or ~/.lance_cl/data)")
    parser.add_argument("--batch-size", type=_positive, default=64, help="batch size (default 64)")
    parser.add_argument("--repeats", type=_positive, default=None,
                        help="timed steps per method (default 31, quick 5)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per method before timing (default 3, quick 1)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="SGD steps of the vanilla model before measuring (default 48, quick 12)")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="torch.set_num_threads (default: torch's default, all available cores)")
    parser.add_argument("--models", type=_csv("model", MODELS), default=MODELS,
                        help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--methods", type=_csv("method", methods), default=defaults,
                        help=f"comma-separated list from {','.join(methods)} (vanilla always runs; "
                             f"default {','.join(defaults)})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the training order")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` that parsed ``lance-cl bench`` arguments describe."""
    overrides: dict[str, Any] = dict(
        models=tuple(args.models), methods=tuple(args.methods), batch_size=args.batch_size,
        threads=args.threads, device=args.device, data_root=args.data_root, seed=args.seed)
    for key in ("repeats", "warmup", "train_steps"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    return BenchConfig.quick_preset(**overrides) if args.quick else BenchConfig(**overrides)


def main(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    """Run the bench from parsed arguments; print the summary table. Returns the exit status."""
    cfg = config_from_args(args)
    command = "lance-cl " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        result = run_bench(cfg, progress=True, command=command)
    except (BenchDataError, BenchSetupError) as e:
        print(f"lance-cl bench: {e}", file=sys.stderr)
        return 1
    json_path, md_path = write_outputs(result, args.out)
    print(render_markdown(result, details=False))
    print(f"wrote {json_path} and {md_path} ({result['elapsed_s']:.0f} s)")
    failed = failures(result)
    if failed:
        print("lance-cl bench: some methods could not be measured:\n  " + "\n  ".join(failed),
              file=sys.stderr)
        return 1
    return 0
