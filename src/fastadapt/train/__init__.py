"""Training and evaluation workflow."""

from .evaluate import Estimate, evaluate, mean_ci95
from .loop import meta_train

__all__ = ["Estimate", "evaluate", "mean_ci95", "meta_train"]
