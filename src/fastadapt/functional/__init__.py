"""The engine: parameters as dicts, the functional inner loop, task-wise meta-gradients."""

from .inner_loop import LossFn, Params, forward, inner_adapt
from .taskwise import loss_with_grads

__all__ = ["LossFn", "Params", "forward", "inner_adapt", "loss_with_grads"]
