"""What every subspace-protecting CL method needs: fan-in views of layer inputs, their Gram
matrices over a task's data, the protected-layer selection and the optimizer guard."""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.conv2d import ConvSpec, layout_view
from ..core.linalg import mode_gram
from ..train_modes import preserved_train_modes

DEFAULT_EXCLUDE = ("heads", "heads.*", "*.heads.*", "classifier*", "*.classifier*")


def fan_in_view(module: nn.Module, x: Tensor) -> Tensor:
    """Layer input -> (N, d, L) with the fan-in axis of ``weight.view(C_out, -1)`` at mode 1.

    Conv2d: im2col patches (B, C*kh*kw, L) after the layer's own padding; Linear: (tokens, I, 1).
    """
    if isinstance(module, nn.Conv2d):
        spec = ConvSpec.build(module.kernel_size, module.stride, module.padding, module.dilation,
                              module.groups, module.padding_mode)
        return layout_view(spec.apply_pre_pad(x), module.kernel_size, spec, "patch")
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1], 1)
    raise TypeError(f"{type(module).__name__} has no fan-in view; only Linear and Conv2d layers "
                    f"can be protected")


def fan_in_dim(module: nn.Module) -> int:
    """d = fan-in of the weight (all groups together for a grouped conv)."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    return module.in_features


# classes whose Linear layers are task heads wherever they sit (Avalanche's multi-head and
# incremental classifiers; lance_cl's MultiHeadModule keeps its heads in ``.heads``)
HEAD_CLASSES = ("MultiHeadClassifier", "IncrementalClassifier")


def head_layer_names(model: nn.Module) -> list[str]:
    """The model's own output layers, whatever they are called: every Linear/Conv2d inside an
    Avalanche ``MultiHeadClassifier`` / ``IncrementalClassifier`` or a MultiHeadModule's
    ``heads``; a model with none of these has one output layer, its last Linear (torchvision's
    ``fc``, ``classifier.1``, ...)."""
    containers = [name for name, m in model.named_modules()
                  if any(c.__name__ in HEAD_CLASSES for c in type(m).__mro__)]
    if isinstance(getattr(model, "heads", None), nn.ModuleList):
        containers.append("heads")
    weights = [(name, m) for name, m in model.named_modules()
               if name and isinstance(m, (nn.Linear, nn.Conv2d))]
    if containers:
        return [name for name, _ in weights
                if any(name == c or name.startswith(c + ".") if c else True for c in containers)]
    linears = [name for name, m in weights if isinstance(m, nn.Linear)]
    return linears[-1:]


def protected_layer_names(model: nn.Module, layers: Optional[Sequence[str]] = None,
                          exclude: Sequence[str] = DEFAULT_EXCLUDE,
                          heads: Optional[Sequence[str]] = None) -> list[str]:
    """Linear/Conv2d modules whose weights are shared across tasks.

    ``layers``: explicit name globs to protect instead of the default selection. Otherwise every
    Linear/Conv2d except those matching ``exclude`` and the heads: ``heads`` names them
    explicitly (``[]``: no head), default :func:`head_layer_names`. Heads are never protected.
    """
    head_names = set(head_layer_names(model) if heads is None else heads)
    names = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, (nn.Linear, nn.Conv2d)) or name in head_names:
            continue
        if layers is not None:
            if any(fnmatch.fnmatchcase(name, pat) for pat in layers):
                names.append(name)
        elif not any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            names.append(name)
    if not names:
        raise ValueError("no Linear/Conv2d layer to protect: check layers= / exclude=")
    return names


@torch.no_grad()
def collect_fan_in_grams(model: nn.Module, names: Sequence[str], batches: Iterable[Any],
                         forward: Callable[[nn.Module, Any], Any],
                         max_samples: Optional[int] = None,
                         rows: Optional[dict[str, int]] = None) -> dict[str, Tensor]:
    """Sum of fan-in Gram matrices (d, d), float64, of each named layer's input over ``batches``
    (the GPM representation matrix R R^T), using at most ``max_samples`` samples. Eval mode.
    Products and sums are float64, as GPM's reference SVD of the representation matrix. (Float32
    products for the convs' patch Grams would make the basis growth of a 5-task CIFAR-10 run 2 s
    faster; they are not used, to keep the baselines' bases as published. A split_digits run's
    outcome moves with any rounding change: with these float64 Grams, 2 torch threads instead of
    1 move LANCE-CL's seed 1 from BWT -7.96 to -0.35; docs/memory.md.)
    ``rows``: filled with the number of fan-in vectors summed per layer (a bound on the Gram's
    rank: samples for a Linear, samples x positions for a conv)."""
    grams: dict[str, Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(mod, inputs, output, name=name):
            view = fan_in_view(mod, inputs[0].detach())
            g = mode_gram(view.to(torch.float64), 1)
            grams[name] = g if name not in grams else grams[name] + g
            if rows is not None:
                rows[name] = rows.get(name, 0) + view.numel() // view.shape[1]
        handles.append(module.register_forward_hook(hook))
    seen = 0
    try:
        with preserved_train_modes(model):
            model.eval()
            for batch in batches:
                if max_samples is not None:
                    if seen >= max_samples:
                        break
                    batch = [b[: max_samples - seen] for b in batch]
                forward(model, batch)
                seen += len(batch[0])
    finally:
        for h in handles:
            h.remove()
    return grams


SAFE_OPTIMIZERS = (torch.optim.SGD,)


class UnsafeOptimizerError(ValueError):
    """The optimizer would move protected weights out of their allowed subspace."""


def check_optimizer(optimizer: torch.optim.Optimizer, protected: Iterable[nn.Parameter],
                    owner: str, allow_unsafe: bool = False) -> None:
    """Refuse optimizers that break orthogonal protection: weight decay on a protected weight
    (it shrinks old-task directions) and coordinate-rescaling optimizers (Adam, RMSprop, ...),
    whose step is no longer in the span of the projected gradient."""
    if allow_unsafe:
        return
    protected_ids = {id(p) for p in protected}
    if not isinstance(optimizer, SAFE_OPTIMIZERS):
        raise UnsafeOptimizerError(
            f"{owner}: {type(optimizer).__name__} rescales gradient coordinates, so its updates "
            f"leave the subspace that protects earlier tasks. Use torch.optim.SGD (momentum is "
            f"fine: its state is reset at every task), or pass allow_unsafe_optimizer=True to "
            f"accept forgetting.")
    for group in optimizer.param_groups:
        if group.get("weight_decay", 0) and any(id(p) in protected_ids for p in group["params"]):
            raise UnsafeOptimizerError(
                f"{owner}: weight_decay={group['weight_decay']} applies to protected weights and "
                f"shrinks the directions earlier tasks rely on. Put protected weights in a param "
                f"group with weight_decay=0 (heads may keep theirs), or pass "
                f"allow_unsafe_optimizer=True.")


def reset_momentum(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Forget optimizer state (momentum buffers) of ``params``: a buffer from an earlier task
    holds directions that are protected now."""
    for p in params:
        optimizer.state.pop(p, None)
