"""The engine: parameters as dicts, the one inner loop (`adapt`), differentiable inner optimizers
(gradient transformations), meta-gradient rules, the planner and its fast kernels."""

from .implicit import conjugate_gradient, implicit_meta_gradient
from .inner_loop import LossFn, Params, StepHooks, SupportLoss, Trajectory, adapt, forward, inner_step, model_support_loss
from .optim import (AdamState, GradientTransformation, add_decayed_weights, adam, apply_updates, chain,
                    clip_by_global_norm, momentum, scale_by_adam, scale_by_lr, sgd, trace)
from .query_pass import QueryPass, mixed_precision
from .rules import meta_gradients, reptile_direction
from .taskwise import add_gradients, loss_with_grads, place_gradients

__all__ = ["AdamState", "GradientTransformation", "LossFn", "Params", "QueryPass", "StepHooks", "SupportLoss",
           "Trajectory", "adam", "adapt", "add_decayed_weights", "add_gradients", "apply_updates", "chain",
           "clip_by_global_norm", "conjugate_gradient", "forward", "implicit_meta_gradient", "inner_step",
           "loss_with_grads", "meta_gradients", "mixed_precision", "model_support_loss", "momentum",
           "place_gradients", "reptile_direction", "scale_by_adam", "scale_by_lr", "sgd", "trace"]
