"""Backbones used by the benchmarks: GPM's AlexNet-5, a small CNN, a MobileNetV2-style stack."""

from .alexnet import AlexNet5
from .heads import MultiHeadModule
from .mobilenet import InvertedResidual, MobileNetV2Blocks
from .small_cnn import SmallCNN

__all__ = ["AlexNet5", "InvertedResidual", "MobileNetV2Blocks", "MultiHeadModule", "SmallCNN"]
