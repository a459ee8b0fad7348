"""Continual-learning plugins that protect earlier tasks' input subspaces."""
from .agem import ResumableAGEMPlugin
from .base import SubspacePlugin, forward_batch
from .codecl import CODEPlugin
from .gpm import GPMPlugin, SGPPlugin
from .lance import LanceCLPlugin
from .trgp import TRGPPlugin

__all__ = ["SubspacePlugin", "GPMPlugin", "SGPPlugin", "LanceCLPlugin", "TRGPPlugin", "CODEPlugin", "forward_batch", "ResumableAGEMPlugin"]
