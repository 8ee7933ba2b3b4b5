"""The engine: parameters as dicts, the functional inner loop, differentiable inner optimizers,
split and task-wise meta-gradients."""

from .inner_loop import LossFn, Params, StepHooks, forward, inner_adapt, inner_trajectory
from .optim import (AdamState, GradientTransformation, add_decayed_weights, adam, apply_updates, chain,
                    clip_by_global_norm, momentum, scale_by_adam, scale_by_lr, sgd, trace)
from .split import QueryPass, mixed_precision, split_meta_gradients
from .taskwise import add_gradients, loss_with_grads, place_gradients

__all__ = ["AdamState", "GradientTransformation", "LossFn", "Params", "QueryPass", "StepHooks", "adam",
           "add_decayed_weights", "add_gradients", "apply_updates", "chain", "clip_by_global_norm", "forward",
           "inner_adapt", "inner_trajectory", "loss_with_grads", "mixed_precision", "momentum", "place_gradients",
           "scale_by_adam", "scale_by_lr", "sgd", "split_meta_gradients", "trace"]
