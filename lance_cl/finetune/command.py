"""``lance-cl finetune``: argparse wiring. Only the standard library is imported here; the
experiment's modules (torch, data, models) load when the command runs."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, Optional, Sequence

from .protocol import (ASI_PROTOCOL, BUDGET_METHODS, DATASETS_HELP, EPS_METHODS, HEAD_MODES,
                       METHOD_NAMES, parse_method_values, parse_seeds)

__all__ = ["add_finetune_parser", "cmd_finetune"]

MODEL_CHOICES = ("mobilenet_v2", "resnet18", "resnet34", "mobilenet_blocks")


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [n for n in names if n not in METHOD_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose "
                                         f"from {', '.join(METHOD_NAMES)}")
    return names


def _layers(text: str) -> tuple[Any, ...]:
    specs = tuple(int(s) if s.strip().isdigit() else s.strip() for s in text.split(",") if s.strip())
    if not specs:
        raise argparse.ArgumentTypeError("--layers needs N (e.g. 2,4) or a layer-name glob")
    return specs


def _batch_modes(text: str) -> dict[str, bool]:
    values = _per_method(EPS_METHODS, "compress-batch")(text)
    wrong = {m: v for m, v in values.items() if v not in (0, 1)}
    if wrong:
        raise argparse.ArgumentTypeError(f"--compress-batch {text!r}: give 1 (compress) or 0 (keep) "
                                         f"per method, not {wrong}")
    return {m: bool(v) for m, v in values.items()}


def _per_method(allowed: tuple[str, ...], what: str):
    def parse(text: str) -> dict[str, float]:
        try:
            return parse_method_values(text, allowed, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def add_finetune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``finetune`` to ``subparsers``; its handler is :func:`cmd_finetune`."""
    d = ASI_PROTOCOL
    p = subparsers.add_parser(
        "finetune", help="fine-tune the last layers of a pretrained backbone with each compression "
                         "method; accuracy, memory, FLOPs and time",
        description="Fine-tune the last N Conv2d/Linear layers (execution order) of a pretrained "
                    "backbone on a downstream data set with each method, the rest frozen, with the "
                    "same data order, seed and schedule for every method. Writes finetune.json, "
                    "finetune.md and finetune.png to --out. Defaults: ASI's protocol (224x224, SGD "
                    "lr 0.05, momentum 0, cosine over 50 epochs, batch 128, clip 2.0). With "
                    "--pretrain FILE: train the model from scratch on --dataset and save its "
                    "state_dict to FILE instead (the offline protocol, docs/finetune.md).",
        epilog="Exit status: 0 when every run finished, 1 when data or weights are missing or a "
               "run failed (its row says why; the others still ran).")
    p.add_argument("--model", choices=MODEL_CHOICES, default=d.model,
                   help=f"backbone (default {d.model}); mobilenet_blocks is the zoo's small "
                        "MobileNetV2-style network")
    p.add_argument("--weights", default=None,
                   help="torchvision weight name (IMAGENET1K_V1, DEFAULT; downloaded when online) or "
                        "a local state_dict file (default: random initialisation)")
    p.add_argument("--dataset", default=d.dataset, help=f"downstream data set: {DATASETS_HELP}")
    p.add_argument("--data-root", default=None,
                   help="where data sets live (default: $LANCE_CL_DATA, ../shared/data or "
                        "~/.lance_cl/data)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download missing CIFAR / MNIST / Flowers102 / Pets files")
    p.add_argument("--layers", type=_layers, default=d.layers,
                   help="comma-separated: N = the last N layers (see --head), or name globs "
                        "(default 2,4)")
    p.add_argument("--head", choices=HEAD_MODES, default=d.head,
                   help="plain (default, as the ASI and HOSVD_eps code): N counts convolutions and "
                        "the classifier trains uncompressed on top; compressed: N counts Conv2d and "
                        "Linear layers and the classifier is compressed with the method")
    p.add_argument("--compact", action="store_true",
                   help="also compact the saved tensors of BatchNorm / activations / dropout / "
                        "pooling (lance_cl.compact_activations, exact) for every method")
    p.add_argument("--methods", type=_methods, default=d.methods,
                   help=f"comma-separated from {','.join(METHOD_NAMES)} (default: all)")
    p.add_argument("--eps", type=_per_method(EPS_METHODS, "eps"), default=None,
                   help="energy threshold: one value for lance, asi and hosvd, or per method "
                        "'lance=0.7,asi=0.8,hosvd=0.8' (default: that)")
    p.add_argument("--budget", type=_per_method(BUDGET_METHODS, "budget"), default=None,
                   help="byte budget over the fine-tuned layers instead of eps, e.g. 'asi=250000'")
    p.add_argument("--compress-batch", type=_batch_modes, default=None, metavar="METHOD=0|1,...",
                   help="compress the batch mode too (1) or not (0), per method of "
                        f"{', '.join(EPS_METHODS)}; 'lance=1' is LANCE's published variant (a "
                        "batch factor fixed at calibration). Default: each method's own "
                        "(lance 0, asi and hosvd 1; docs/core.md)")
    p.add_argument("--radius", type=int, default=d.radius, help="gradient_filter block side R (default 2)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"default {d.lr}")
    p.add_argument("--momentum", type=float, default=d.momentum, help=f"default {d.momentum}")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"default {d.weight_decay}")
    p.add_argument("--clip-norm", type=float, default=d.clip_norm,
                   help=f"L2 gradient clipping threshold, 0 = none (default {d.clip_norm})")
    p.add_argument("--image-size", type=int, default=d.image_size, help=f"default {d.image_size}")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--calibration-batches", type=int, default=d.lance_calibration_batches,
                   help=f"lance calibration batches (default {d.lance_calibration_batches}; asi uses 1)")
    p.add_argument("--eval-every", type=int, default=1,
                   help="test accuracy every k epochs and after the last (default 1)")
    p.add_argument("--seeds", default="233", help="seeds: '0', '0,1,2' or '0-2' (default 233)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="use this many training images (a fixed shuffle; default all)")
    p.add_argument("--test-limit", type=int, default=None, help="use this many test images")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="finetune_out", help="output folder (default finetune_out/)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.add_argument("--pretrain", metavar="FILE", default=None,
                   help="train --model from scratch on --dataset (all layers, --epochs, --batch-size, "
                        "--lr, momentum 0.9) and save its state_dict to FILE; no fine-tuning")
    p.set_defaults(handler=cmd_finetune)
    return p


def cmd_finetune(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    """Run ``lance-cl finetune`` from parsed arguments. Returns the exit status."""
    from ..data import DatasetNotFoundError
    from .models import WeightsNotFoundError
    from .protocol import FinetuneConfig

    command = "lance-cl " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        seeds = parse_seeds(args.seeds)
        if args.pretrain:
            from .runner import pretrain

            record = pretrain(args.model, args.dataset, args.pretrain, data_root=args.data_root,
                              epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              image_size=args.image_size, seed=seeds[0],
                              train_limit=args.train_limit, threads=args.threads,
                              progress=not args.no_progress, command=command)
            print(f"wrote {args.pretrain} (test accuracy {record['history'][-1]['test_accuracy']:.2f}% "
                  f"after {args.epochs} epochs, {record['elapsed_s']:.0f} s)")
            return 0
        config = FinetuneConfig(
            model=args.model, weights=args.weights, dataset=args.dataset, data_root=args.data_root,
            download=args.download, layers=tuple(args.layers), head=args.head, compact=args.compact,
            methods=tuple(args.methods),
            eps=args.eps if args.eps is not None else dict(ASI_PROTOCOL.eps),
            budget=args.budget or {}, compress_batch=args.compress_batch or {},
            radius=args.radius, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, clip_norm=args.clip_norm or None,
            image_size=args.image_size, flip=not args.no_flip,
            lance_calibration_batches=args.calibration_batches, eval_every=args.eval_every,
            seeds=tuple(seeds),
            train_limit=args.train_limit, test_limit=args.test_limit, device=args.device,
            threads=args.threads)
        from .results import render_table
        from .runner import run_finetune

        result = run_finetune(config, args.out, progress=not args.no_progress, command=command)
    except (DatasetNotFoundError, WeightsNotFoundError, ValueError, argparse.ArgumentTypeError) as e:
        print(f"lance-cl finetune: {e}", file=sys.stderr)
        return 1
    print(render_table(result))
    print(f"wrote {args.out}/finetune.json, finetune.md and finetune.png "
          f"({result.get('elapsed_s', 0):.0f} s)")
    return 1 if any(r["status"] != "ok" for r in result["runs"]) else 0
