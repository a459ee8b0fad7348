"""Backbones used by the benchmarks: GPM's AlexNet-5, the reduced ResNet-18, a small CNN,
a MobileNetV2-style stack. The CL backbones are Avalanche ``MultiTaskModule``s (one head per task)."""

from .alexnet import AlexNet5
from .heads import MultiHeadModule
from .mobilenet import InvertedResidual, MobileNetV2Blocks
from .resnet import BasicBlock, ReducedResNet18
from .small_cnn import SmallCNN

__all__ = [
    "AlexNet5",
    "BasicBlock",
    "InvertedResidual",
    "MobileNetV2Blocks",
    "MultiHeadModule",
    "ReducedResNet18",
    "SmallCNN",
]
