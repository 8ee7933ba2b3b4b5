"""The engine: parameters as dicts, the functional inner loop, differentiable inner optimizers,
split and task-wise meta-gradients."""

from .inner_loop import LossFn, Params, StepHooks, forward, inner_adapt, inner_trajectory
from .optim import AdamState, InnerOptimizer, adam, momentum, sgd
from .split import QueryPass, mixed_precision, split_meta_gradients
from .taskwise import add_gradients, loss_with_grads, place_gradients

__all__ = ["AdamState", "InnerOptimizer", "LossFn", "Params", "QueryPass", "StepHooks", "adam", "add_gradients", "forward",
           "inner_adapt", "inner_trajectory", "loss_with_grads", "mixed_precision", "momentum", "place_gradients",
           "sgd", "split_meta_gradients"]
