"""Fine-tuning with compressed activations (``lance-cl finetune``): the seeds' fine-tuning
experiment (ASI Tables 1-2, LANCE Table 1) as a library and a command. See docs/finetune.md.

    config = FinetuneConfig(model="mobilenet_v2", weights="IMAGENET1K_V1", dataset="cifar10")
    result = run_finetune(config, out="finetune_out")     # finetune.json / .md / .png

Importing this package loads only the protocol (standard library); the rest loads on first use.
"""
from __future__ import annotations

from .protocol import ASI_PROTOCOL, METHOD_NAMES, OFFLINE_PROTOCOL, FinetuneConfig

_LAZY = {
    "run_finetune": "runner", "pretrain": "runner", "machine_info": "runner",
    "run_method": "loop", "prepare_model": "loop", "finetuned_layer_names": "loop",
    "gradient_agreement": "loop", "load_finetune_data": "data", "FinetuneData": "data",
    "build_backbone": "models", "WeightsNotFoundError": "models",
    "render_table": "results", "summarize": "results", "write_outputs": "results",
    "load_result": "results", "plot_accuracy_vs_memory": "results",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lance_cl.finetune' has no attribute {name!r}")


__all__ = ["ASI_PROTOCOL", "FinetuneConfig", "METHOD_NAMES", "OFFLINE_PROTOCOL", *_LAZY]
