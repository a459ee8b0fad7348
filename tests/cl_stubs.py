"""Test-only stand-ins for ``lance_cl.strategies`` (naive fine-tuning), installed with monkeypatch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn


class Calls:
    """What the stub saw: number of ``train`` calls, and an experience index to fail at."""

    def __init__(self) -> None:
        self.train_calls = 0
        self.fail_at: int | None = None
        self.built = 0


def install(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Patch build_strategy / memory_figures / strategy_state / load_strategy_state."""
    import lance_cl.strategies as S
    from avalanche.core import SupervisedPlugin
    from avalanche.training import Naive

    calls = Calls()

    class Boom(SupervisedPlugin):
        def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            calls.train_calls += 1
            if calls.fail_at is not None and strategy.experience.current_experience == calls.fail_at:
                raise RuntimeError(f"simulated crash in task {calls.fail_at}")

    def build_strategy(name: str, model: nn.Module, spec: Any, *, device: str, epochs: int,
                       extra_plugins: list, evaluator: Any = None) -> Any:
        assert name in ("naive", "naive2")
        calls.built += 1
        d = spec.defaults
        return Naive(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=d["lr"]),
            criterion=nn.CrossEntropyLoss(), train_mb_size=d["batch_size"], train_epochs=epochs,
            eval_mb_size=d["eval_batch_size"], device=device,
            plugins=[Boom(), *extra_plugins], evaluator=evaluator,
        )

    def memory_figures(strategy: Any) -> dict[str, int]:
        heads = sum(p.numel() * p.element_size() for p in strategy.model.heads.parameters())
        return {"persistent_bytes": int(heads), "training_extra_bytes": 0}

    def parse_strategy(name: str) -> tuple[Any, bool]:
        if name not in ("naive", "naive2"):
            raise ValueError(f"unknown strategy {name!r}; choose from naive, naive2")
        return name, False

    monkeypatch.setattr(S, "build_strategy", build_strategy, raising=False)
    monkeypatch.setattr(S, "parse_strategy", parse_strategy, raising=False)
    monkeypatch.setattr(S, "memory_figures", memory_figures, raising=False)
    monkeypatch.setattr(S, "strategy_state", lambda strategy: {"stub": 1}, raising=False)
    monkeypatch.setattr(S, "load_strategy_state", lambda strategy, state, past_datasets=(): None, raising=False)
    return calls
