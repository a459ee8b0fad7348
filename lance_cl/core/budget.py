"""Budgeted rank selection (ASI section 3.3) as an exact-enough knapsack dynamic programme.

Each layer offers options (bytes, error), one per energy threshold; pick one option per layer so
that total bytes <= budget and total error is minimal. Bytes are rounded *up* to a grid of
``resolution`` cells, so the chosen combination never exceeds the budget. O(layers x options x
resolution) instead of the published exponential backtracking.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


class BudgetTooSmallError(ValueError):
    """No combination of options fits the budget."""


def select_under_budget(options: Sequence[Sequence[tuple[float, float]]], budget: float,
                        resolution: int = 2000) -> list[int]:
    """Index of the chosen option per layer. options[i][j] = (bytes, error) of option j of layer i."""
    if not options:
        return []
    if any(len(o) == 0 for o in options):
        raise ValueError("every layer needs at least one option")
    minimum = sum(min(b for b, _ in layer) for layer in options)
    if minimum > budget:
        raise BudgetTooSmallError(
            f"budget of {budget:,.0f} bytes is below the smallest possible activation memory of "
            f"these layers ({minimum:,.0f} bytes, every layer at its lowest energy threshold); "
            f"raise budget= to at least {math.ceil(minimum):,} or compress fewer layers")
    cell = budget / resolution
    inf = float("inf")
    best = torch.full((resolution + 1,), inf, dtype=torch.float64)   # best[c]: min error, <= c cells
    best[0] = 0.0
    choice = []
    for layer in options:
        new = torch.full_like(best, inf)
        arg = torch.full((resolution + 1,), -1, dtype=torch.long)
        for j, (nbytes, err) in enumerate(layer):
            w = math.ceil(nbytes / cell - 1e-9)
            if w > resolution:
                continue
            cand = torch.full_like(best, inf)
            cand[w:] = best[: resolution + 1 - w] + err
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.full_like(arg, j), arg)
        best = new
        choice.append(arg)
    if not torch.isfinite(best).any():
        # Rounding up can push a barely-feasible combination over; fall back to the cheapest.
        return [min(range(len(layer)), key=lambda j: layer[j][0]) for layer in options]
    c = int(torch.argmin(best).item())
    picks = [0] * len(options)
    for i in range(len(options) - 1, -1, -1):
        j = int(choice[i][c].item())
        picks[i] = j
        c -= math.ceil(options[i][j][0] / cell - 1e-9)
    return picks
