"""The engine: parameters as dicts, the functional inner loop, split and task-wise meta-gradients."""

from .inner_loop import LossFn, Params, forward, inner_adapt
from .split import QueryPass, mixed_precision, split_meta_gradients
from .taskwise import add_gradients, loss_with_grads, place_gradients

__all__ = ["LossFn", "Params", "QueryPass", "add_gradients", "forward", "inner_adapt", "loss_with_grads",
           "mixed_precision", "place_gradients", "split_meta_gradients"]
