"""Backbones: Conv4 (Omniglot and mini-ImageNet variants), ResNet-12 and MLP."""

from .conv4 import Conv4
from .mlp import MLP
from .resnet12 import DropBlock, ResNet12

__all__ = ["Conv4", "DropBlock", "MLP", "ResNet12"]
