"""Training and evaluation workflow: configs and recipes, the trainer, checkpoints, evaluation."""

from .config import Config, ConfigError
from .evaluate import Estimate, evaluate_learner, evaluate_under_attack, mean_ci95
from .loop import meta_train
from .recipes import load_recipe, parse_overrides, run_recipe

__all__ = ["Config", "ConfigError", "Estimate", "evaluate_learner", "evaluate_under_attack", "load_recipe", "mean_ci95", "meta_train", "parse_overrides",
           "run_recipe"]
