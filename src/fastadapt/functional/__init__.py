"""The engine: parameters as dicts, the functional inner loop, split and task-wise meta-gradients."""

from .inner_loop import LossFn, Params, forward, inner_adapt
from .split import QueryPass, split_meta_gradients
from .taskwise import loss_with_grads

__all__ = ["LossFn", "Params", "QueryPass", "forward", "inner_adapt", "loss_with_grads", "split_meta_gradients"]
