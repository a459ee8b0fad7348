"""CODE-CL (Apolinario et al., ICCV 2025): conceptor-based gradient projection. Placeholder."""
from __future__ import annotations

from .base import SubspacePlugin


class CODEPlugin(SubspacePlugin):
    """Not implemented yet."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("CODEPlugin is being written")


def recipe_plugins(defaults: dict) -> list:
    """The plugins of recipe ``codecl`` from a benchmark's defaults."""
    return [CODEPlugin()]
