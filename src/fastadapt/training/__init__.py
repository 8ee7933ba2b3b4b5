"""Training and evaluation workflow: configs and recipes, the trainer, checkpoints, evaluation."""

from .config import Config, ConfigError, load_recipe, parse_overrides
from .evaluate import Estimate, evaluate_learner, mean_ci95
from .loop import meta_train

__all__ = ["Config", "ConfigError", "Estimate", "evaluate_learner", "load_recipe", "mean_ci95", "meta_train", "parse_overrides"]
