"""Named strategy recipes: each compared method as an Avalanche strategy with its plugins and
published hyperparameters (installed as ``lance_cl.strategies``).

>>> strategy = build_strategy("lance", model, spec, device="cpu")
>>> for exp in spec.benchmark.train_stream: strategy.train(exp)

All recipes use plain SGD (no momentum, no weight decay: the GPM protocol) with the benchmark's
learning rate, batch size and epochs from ``spec.defaults``. Extra plugins (the validation
schedule, loggers) are appended by the caller.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from avalanche.training import Cumulative, Naive
from avalanche.training.plugins import AGEMPlugin, EvaluationPlugin, EWCPlugin, LwFPlugin
from torch import nn

from ..cl.plugins import codecl, trgp
from ..cl.plugins import GPMPlugin, LanceCLPlugin, ResumableAGEMPlugin, SGPPlugin
from ..cl.sizes import dataset_bytes, parameter_bytes, tensor_bytes
from ..cl.subspace import head_layer_names


@dataclass(frozen=True)
class Recipe:
    """How to build one compared method. ``compact``: whether the recipe compacts the saved
    tensors of the non-weight ops (ReLU, dropout, max-pool, BatchNorm) by default."""

    name: str
    description: str
    plugins: Callable[[dict], list]
    template: type = Naive
    compact: bool = False


COMPACT_SUFFIX = "+compact"
PLAIN_SUFFIX = "+plain"


def parse_strategy(name: str) -> tuple[Recipe, bool]:
    """'gpm' -> (GPM's recipe, its default compaction); 'gpm+compact' / 'lance+plain' force
    compaction on / off. Raises ValueError naming the known recipes."""
    base, compact = name, None
    for suffix, value in ((COMPACT_SUFFIX, True), (PLAIN_SUFFIX, False)):
        if name.endswith(suffix):
            base, compact = name[: -len(suffix)], value
    if base not in RECIPES:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(RECIPES)} (optionally "
                         f"with {COMPACT_SUFFIX!r} or {PLAIN_SUFFIX!r})")
    recipe = RECIPES[base]
    return recipe, recipe.compact if compact is None else compact


def with_compaction(name: str) -> str:
    """The strategy name that runs ``name`` with compaction on (``name`` itself if it already does)."""
    recipe, compact = parse_strategy(name)
    return name if compact else recipe.name + COMPACT_SUFFIX


# what a recomputed chunked segment keeps by default (docs/memory.md, "A kept tail")
SEGMENT_TAIL = "keep"


def compaction_options(model: nn.Module, defaults: dict) -> dict:
    """Options of :func:`lance_cl.compact_activations` from the benchmark defaults:
    ``compact_batch_norm`` (storage, "float"), ``compact_dropout`` ("packed") and
    ``compact_recompute`` (segments recomputed in backward; default: the model's stem when it
    declares one and the expansion layers of inverted residual blocks, unless
    ``compact_recompute_stem`` is false) and ``compact_segment_tail`` ("keep": a recomputed
    chunked segment keeps its per-sample ops' 1-bit masks and pool offsets, which spares the
    backward their forward; "recompute": only its input)."""
    from lance_cl.compact import default_recompute

    recompute = defaults.get("compact_recompute")
    if recompute is None:
        recompute = default_recompute(model) if defaults.get("compact_recompute_stem", True) else ()
    return {"batch_norm": defaults.get("compact_batch_norm", "float"),
            "dropout": defaults.get("compact_dropout", "packed"), "recompute": tuple(recompute),
            "segment_tail": defaults.get("compact_segment_tail", SEGMENT_TAIL)}


def _subspace_options(d: dict) -> dict:
    """Options every subspace plugin takes from the benchmark defaults."""
    return {"eps": d.get("eps", 0.97), "eps_step": d.get("eps_step", 0.003),
            "basis_samples": d.get("gpm_samples", 125)}


_RESIDUAL_RULE = ("train_energy", "train_max_rank", "train_max_rank_fraction")


def _lance_training_rule(d: dict) -> dict:
    """Rank rule of LANCE-CL's training factor from the benchmark defaults: the residual-energy
    rule (``train_energy`` 0.9, rank capped at 25 % of the fan-in: chosen on the CIFAR-10
    development split, docs/memory.md) unless ``train_eps`` selects the total-energy rule
    (the residual options given with it make the plugin refuse the mix)."""
    if d.get("train_eps") is not None:
        return {"train_eps": d["train_eps"], **{k: d[k] for k in _RESIDUAL_RULE if d.get(k) is not None}}
    return {"train_energy": d.get("train_energy", 0.9), "train_max_rank": d.get("train_max_rank"),
            "train_max_rank_fraction": d.get("train_max_rank_fraction", 0.25)}


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("lance", "LANCE-CL: compressed activations in task subspaces orthogonal to earlier "
                    "tasks (every task compressed; training rank by residual energy)",
           lambda d: [LanceCLPlugin(**_subspace_options(d), **_lance_training_rule(d),
                                    position_eps=d.get("position_eps", 0.9),
                                    calibration_batches=d.get("calibration_batches"),
                                    calibration_column_ratio=d.get("calibration_column_ratio", 4.0),
                                    small_layer_dim=d.get("small_layer_dim", 80))], compact=True),
    Recipe("lance_paper", "LANCE-CL as published: task 1 with full backprop, training factors at "
                          "energy 0.98 (threshold-conv), CL thresholds of GPM",
           lambda d: [LanceCLPlugin(**_subspace_options(d), first_task="full", train_eps=0.98,
                                    position_eps=0.98)], compact=True),
    Recipe("gpm", "GPM (Saha et al. 2021): gradients projected off the protected bases",
           lambda d: [GPMPlugin(**_subspace_options(d))]),
    Recipe("sgp", "SGP (Saha & Roy 2023): GPM bases with importance-scaled projection",
           lambda d: [SGPPlugin(**_subspace_options(d), alpha=d.get("alpha", 10.0))]),
    Recipe("trgp", "TRGP (Lin et al. 2022): GPM projection plus trust-region scaled weight "
                   "projection on the most related old tasks",
           lambda d: trgp.recipe_plugins(d)),
    Recipe("codecl", "CODE-CL (Apolinario et al. 2025): conceptor-based gradient projection with "
                     "forward transfer on the conceptors' intersection",
           lambda d: codecl.recipe_plugins(d)),
    Recipe("naive", "fine-tuning without protection (lower bound)", lambda d: []),
    Recipe("ewc", "EWC (Kirkpatrick et al. 2017), separate Fisher per task",
           lambda d: [EWCPlugin(ewc_lambda=d.get("ewc_lambda", 100.0))]),
    Recipe("lwf", "LwF (Li & Hoiem 2017): distillation on old heads",
           lambda d: [LwFPlugin(alpha=d.get("lwf_alpha", 1.0), temperature=d.get("lwf_temperature", 2.0))]),
    Recipe("agem", "A-GEM (Chaudhry et al. 2019): episodic memory, averaged gradient constraint",
           lambda d: [ResumableAGEMPlugin(patterns_per_experience=d.get("agem_patterns", 100),
                                          sample_size=d.get("agem_sample_size", 64))]),
    Recipe("joint", "cumulative joint training on every task seen so far (upper bound at the end)",
           lambda d: [], template=Cumulative),
]}


def quiet_evaluator() -> EvaluationPlugin:
    """An evaluator that computes and prints nothing (runs compute their own metrics)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(loggers=[])


def build_strategy(name: str, model: nn.Module, spec: Any, *, device: str = "cpu",
                   epochs: Optional[int] = None, extra_plugins: Sequence = ()):
    """Avalanche strategy for recipe ``name`` on ``model`` with ``spec.defaults`` (lr, batch_size,
    epochs, eps, eps_step, alpha, ...; ``spec`` may also be that dict). ``name`` may end in ``+compact``
    or ``+plain`` (see :func:`parse_strategy`); with compaction the model's ReLU, dropout,
    max-pool and BatchNorm modules save compact tensors (:func:`lance_cl.compact_activations`
    with :func:`compaction_options`), which leaves every gradient exact at the default options."""
    recipe, compact = parse_strategy(name)
    defaults = dict(getattr(spec, "defaults", spec) or {})
    if compact:
        from lance_cl.compact import compact_activations

        compact_activations(model, **compaction_options(model, defaults))
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=defaults.get("lr", 0.01))
    return recipe.template(
        model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
        train_mb_size=defaults.get("batch_size", 64),
        train_epochs=epochs if epochs is not None else defaults.get("epochs", 1),
        eval_mb_size=defaults.get("eval_batch_size", 256), device=device,
        plugins=recipe.plugins(defaults) + list(extra_plugins), evaluator=quiet_evaluator())


def head_bytes(model: nn.Module) -> int:
    """Bytes of the task heads' parameters (kept by every method; the heads of
    :func:`lance_cl.cl.subspace.head_layer_names`)."""
    return sum(parameter_bytes(model.get_submodule(name)) for name in head_layer_names(model))


# -- what each method keeps: plugins report it themselves, Avalanche's through an adapter ----------
#
# A plugin (or strategy template) reports what a run records by defining any of
#   memory_figures(strategy) -> {"persistent_bytes": int, "training_extra_bytes": int}
#   task_diagnostics(task) -> dict (per layer, what the method decided for that task)
#   state_dict() -> dict and load_run_state(state, strategy, past_datasets)
#       (or load_state_dict(state) when resuming needs nothing else)
# as the subspace plugins and ResumableAGEMPlugin do. Avalanche's plugins and templates keep
# their state in plain attributes; the adapters below say, for those, what they hold.


@dataclass(frozen=True)
class StateAdapter:
    """What an Avalanche object of one type keeps: ``persistent_bytes(obj)``, the attributes a
    resume restores, and ``restore(obj, past_datasets)`` for state rebuilt from the finished
    tasks' training datasets instead of being saved."""

    persistent_bytes: Callable[[Any], int]
    attributes: tuple[str, ...] = ()
    restore: Optional[Callable[[Any, Sequence[Any]], None]] = None


def _lwf_bytes(plugin: LwFPlugin) -> int:
    previous = getattr(plugin.lwf, "prev_model", None)
    return 0 if previous is None else parameter_bytes(previous)


def _restore_cumulative(strategy: Cumulative, past_datasets: Sequence[Any]) -> None:
    strategy.dataset = _concat(past_datasets)


AVALANCHE_ADAPTERS: dict[type, StateAdapter] = {
    EWCPlugin: StateAdapter(lambda p: tensor_bytes(p.saved_params) + tensor_bytes(p.importances),
                            attributes=("saved_params", "importances")),
    LwFPlugin: StateAdapter(_lwf_bytes, attributes=("lwf",)),
    AGEMPlugin: StateAdapter(lambda p: sum(dataset_bytes(b) for b in getattr(p, "buffers", []))),
    Cumulative: StateAdapter(lambda s: 0 if getattr(s, "dataset", None) is None else dataset_bytes(s.dataset),
                             restore=_restore_cumulative),
}


def _adapter(obj: Any) -> Optional[StateAdapter]:
    return next((AVALANCHE_ADAPTERS[t] for t in type(obj).__mro__ if t in AVALANCHE_ADAPTERS), None)


def _parts(strategy) -> list[tuple[str, Any]]:
    """The strategy template and its plugins, each with its key in :func:`strategy_state`."""
    return [("strategy", strategy)] + [(f"{i}:{type(p).__name__}", p)
                                       for i, p in enumerate(strategy.plugins)]


def memory_figures(strategy) -> dict[str, int]:
    """Persistent CL state and extra bytes held while training (docs/continual.md), in bytes.

    Persistent state: task heads plus the method's own state (bases and importances for the
    projection methods; Fisher and anchor weights for EWC; the previous model for LwF; the
    episodic memory for A-GEM; the data of earlier tasks for joint training). Training extra:
    what only the training loop holds (GPM/SGP: d x d projections; LANCE: its fixed factors).
    """
    persistent, extra = head_bytes(strategy.model), 0
    for _, part in _parts(strategy):
        own = getattr(part, "memory_figures", None)
        if callable(own):
            figures = own(strategy)
            persistent += figures["persistent_bytes"]
            extra += figures["training_extra_bytes"]
        elif (adapter := _adapter(part)) is not None:
            persistent += adapter.persistent_bytes(part)
    return {"persistent_bytes": int(persistent), "training_extra_bytes": int(extra)}


def task_diagnostics(strategy, task: int) -> dict[str, Any]:
    """Per protected layer, what the strategy's method decided for ``task`` (training rank, ranks
    per mode, energy already covered by the protected basis, basis growth, frozen, storage form):
    the first plugin's non-empty ``task_diagnostics(task)``, else {}."""
    for _, part in _parts(strategy):
        own = getattr(part, "task_diagnostics", None)
        if callable(own) and (found := own(task)):
            return found
    return {}


def strategy_state(strategy) -> dict[str, Any]:
    """Checkpointable state of the strategy and its plugins: ``state_dict()`` where a plugin has
    one (and a way to load it), the adapter's attributes for Avalanche's plugins. State that is
    rebuilt from the task datasets (A-GEM's memory, joint training's data) is stored as
    references to them: see :func:`load_strategy_state`."""
    state: dict[str, Any] = {}
    for key, part in _parts(strategy):
        if callable(getattr(part, "state_dict", None)) and (
                hasattr(part, "load_run_state") or hasattr(part, "load_state_dict")):
            state[key] = part.state_dict()
        elif (adapter := _adapter(part)) is not None:
            state[key] = {a: copy.deepcopy(getattr(part, a)) for a in adapter.attributes}
    return state


def load_strategy_state(strategy, state: dict[str, Any], past_datasets: Sequence[Any] = ()) -> None:
    """Inverse of :func:`strategy_state`; also re-applies the plugins' model-side effects.

    ``past_datasets``: the training datasets of the tasks finished before the checkpoint, in
    task order (``[exp.dataset for exp in train_stream[:k]]``). A-GEM rebuilds its episodic
    memory from them and joint training (Avalanche's ``Cumulative``) its accumulated data."""
    for key, part in _parts(strategy):
        if callable(getattr(part, "load_run_state", None)):
            if key in state:
                part.load_run_state(state[key], strategy, past_datasets)
        elif callable(getattr(part, "load_state_dict", None)):
            if key in state:
                part.load_state_dict(state[key])
        elif (adapter := _adapter(part)) is not None:
            for attr, value in state.get(key, {}).items():
                setattr(part, attr, value)
            if adapter.restore is not None:   # rebuilt from the datasets, saved or not
                adapter.restore(part, past_datasets)


def _concat(datasets: Sequence[Any]) -> Any:
    """Avalanche's concatenation of ``datasets`` in order (None for none), as Cumulative builds it."""
    from avalanche.benchmarks.utils.utils import concat_datasets

    return None if len(datasets) == 0 else concat_datasets(list(datasets))


__all__ = ["RECIPES", "Recipe", "build_strategy", "parse_strategy", "with_compaction",
           "compaction_options", "COMPACT_SUFFIX", "PLAIN_SUFFIX", "memory_figures", "task_diagnostics", "strategy_state",
           "load_strategy_state", "quiet_evaluator", "head_bytes", "AVALANCHE_ADAPTERS", "StateAdapter"]
