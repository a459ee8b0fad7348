"""Compact modules for the ops between weight layers, one file per kind behind one registry."""
from .activation import CompactHardtanh, CompactLeakyReLU, CompactReLU, CompactReLU6
from .base import COMPACT_MODULES, CompactModule, rebind, register_compact_module
from .batchnorm import CompactBatchNorm1d, CompactBatchNorm2d, CompactBatchNorm3d
from .dropout import CompactDropout
from .pooling import CompactMaxPool2d

__all__ = ["COMPACT_MODULES", "CompactModule", "register_compact_module", "rebind", "CompactReLU",
           "CompactReLU6", "CompactHardtanh", "CompactLeakyReLU", "CompactDropout",
           "CompactMaxPool2d", "CompactBatchNorm1d", "CompactBatchNorm2d", "CompactBatchNorm3d"]
