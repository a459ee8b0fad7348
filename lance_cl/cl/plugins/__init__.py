"""Continual-learning plugins that protect earlier tasks' input subspaces."""
from .agem import ResumableAGEMPlugin
from .base import SubspacePlugin, forward_batch
from .gpm import GPMPlugin, SGPPlugin
from .lance import LanceCLPlugin

__all__ = ["SubspacePlugin", "GPMPlugin", "SGPPlugin", "LanceCLPlugin", "forward_batch", "ResumableAGEMPlugin"]
