"""Compressed layer modules, one file per layer type behind one registry."""
from .base import CompressedLayer, LayerMode
from .conv2d import CompressedConv2d
from .linear import CompressedLinear
from .registry import COMPRESSED_LAYERS, compressed_type_for, register_compressed_layer

__all__ = ["CompressedLayer", "LayerMode", "CompressedConv2d", "CompressedLinear", "COMPRESSED_LAYERS",
           "compressed_type_for", "register_compressed_layer"]
