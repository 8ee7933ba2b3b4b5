"""Backbones: Conv4 (Omniglot and mini-ImageNet variants) and MLP."""

from .conv4 import Conv4
from .mlp import MLP

__all__ = ["Conv4", "MLP"]
