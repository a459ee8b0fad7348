"""Test-only recipes registered in ``lance_cl.strategies.RECIPES`` with monkeypatch: the real
naive recipe (real ``build_strategy``, memory figures and state) plus a plugin that counts the
tasks trained and can simulate a crash."""

from __future__ import annotations

from typing import Any

import pytest


class Calls:
    """What the watcher saw: number of tasks started, an experience index to fail at, and how
    many strategies were built."""

    def __init__(self) -> None:
        self.train_calls = 0
        self.fail_at: int | None = None
        self.built = 0


def install(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...] = ("naive", "naive2")) -> Calls:
    """Register each of ``names`` as naive fine-tuning watched by a counting, crashing plugin
    (replacing the real "naive" for the test); returns the shared :class:`Calls`."""
    from avalanche.core import SupervisedPlugin

    import lance_cl.strategies as S

    calls = Calls()
    naive = S.RECIPES["naive"]

    class Watcher(SupervisedPlugin):
        def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            calls.train_calls += 1
            if calls.fail_at is not None and strategy.experience.current_experience == calls.fail_at:
                raise RuntimeError(f"simulated crash in task {calls.fail_at}")

    def plugins(defaults: dict) -> list:
        calls.built += 1
        return [*naive.plugins(defaults), Watcher()]

    for name in names:
        monkeypatch.setitem(S.RECIPES, name, S.Recipe(name, "naive fine-tuning, watched", plugins,
                                                      template=naive.template))
    return calls
