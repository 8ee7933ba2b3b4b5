"""The query pass of a meta-gradient: the query loss and its first-order gradient at the adapted
parameters, the expensive part of a MAML step (15 queries per class against 1 support example on
Omniglot 5w1s: 83% of a step, measured). It has no `create_graph` backward, so it can run compiled
(`torch.compile`) or under bf16 autocast; `functional.rules` then applies it through the inner loop.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .inner_loop import LossFn, Params, forward

__all__ = ["QueryPass", "mixed_precision", "check_step_weights"]


class QueryPass:
    """Query loss and its first-order gradient w.r.t. (detached copies of) the adapted parameters.

    Args:
        model: the module `params` belong to.
        loss_fn: `loss_fn(output, target)`.
        compile: run the forward and its backward through `torch.compile` (one compilation per
            input shape; needs a C++ compiler).
        autocast_dtype: e.g. `torch.bfloat16` for mixed precision on CPU; gradients stay in the
            parameters' dtype.

    Example:
        >>> m = torch.nn.Linear(2, 1)
        >>> out, loss, grads = QueryPass(m, torch.nn.functional.mse_loss)(
        ...     dict(m.named_parameters()), torch.ones(3, 2), torch.zeros(3, 1))
        >>> sorted(grads)
        ['bias', 'weight']
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, compile: bool = False,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.autocast_dtype = autocast_dtype
        self._loss_and_output = torch.compile(self._eager, dynamic=False) if compile else self._eager

    def _eager(self, params: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with mixed_precision(self.autocast_dtype):
            output = forward(self.model, params, x)
            return self.loss_fn(output, y), output

    def __call__(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, *,
                 inputs: Callable[[Params], Tensor] | None = None,
                 extra: Callable[[Params], Tensor] | None = None) -> tuple[Tensor, Tensor, Params]:
        """Returns the detached output and loss, and the gradient of the loss for every entry.

        `inputs(params)` (optional) gives the query inputs in place of `x` (a query hook: its
        dependence on the parameters is differentiated), `extra(params)` a term added to the loss.
        """
        leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
        with torch.enable_grad():
            loss, output = self._loss_and_output(leaves, x if inputs is None else inputs(leaves), y)
            if extra is not None:
                loss = loss + extra(leaves)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
        return output.detach().to(loss.dtype), loss.detach(), dict(zip(leaves, grads))


def mixed_precision(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on the CPU (and CUDA, where present), or nothing for None (full precision)."""
    return _autocast(dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _autocast(dtype: torch.dtype) -> Iterator[None]:
    on_gpu = torch.autocast("cuda", dtype=dtype) if torch.cuda.is_available() else contextlib.nullcontext()
    with torch.autocast("cpu", dtype=dtype), on_gpu:
        yield


def check_step_weights(step_weights: Sequence[float] | None, steps: int) -> list[float]:
    """The multi-step loss weights w_1 .. w_steps; None is the plain loss after the last step."""
    if step_weights is None:
        return [0.0] * (steps - 1) + [1.0]
    weights = [float(w) for w in step_weights]
    if len(weights) != steps or any(w < 0 for w in weights):
        raise ValueError(f"step_weights must be {steps} numbers >= 0 (one per inner step), got {list(step_weights)}")
    return weights
