"""TRGP (Lin et al., ICLR 2022): trust-region gradient projection. Placeholder being written."""
from __future__ import annotations

from .base import SubspacePlugin


class TRGPPlugin(SubspacePlugin):
    """Not implemented yet."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("TRGPPlugin is being written")


def recipe_plugins(defaults: dict) -> list:
    """The plugins of recipe ``trgp`` from a benchmark's defaults."""
    return [TRGPPlugin()]
