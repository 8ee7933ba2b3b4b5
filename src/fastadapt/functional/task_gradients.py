"""Every task's gradient at the same parameters, all tasks at once where that is exact.

`task_gradients(model, params, x, y, loss_fn)` is `grad loss_fn(model(params; x[t]), y[t])` for
each task t, stacked `(T, *p.shape)`: what an inference step from shared parameters needs
(PLATIPUS's `mu - gamma * grad`). With `create_graph` the gradients are differentiable, to second
order, in `params` and whatever made them. It runs

- as one grouped-convolution graph for a conv/BatchNorm/ReLU/pool/Linear chain
  (`task_batched_forward`: each task's own BatchNorm statistics, exactly), the parameters
  expanded per task and differentiated through the expansion;
- under `torch.func.vmap` (with `torch.func.grad`) for a model whose layers all have exact vmap
  rules (`vmap_exact`);
- otherwise task by task: the reference, for every model.

Example:
    >>> import torch
    >>> from fastadapt.nn import MLP
    >>> model = MLP(1, [8], 1)
    >>> params = dict(model.named_parameters())
    >>> grads = task_gradients(model, params, torch.rand(3, 5, 1), torch.rand(3, 5, 1), torch.nn.functional.mse_loss)
    >>> grads["layers.0.weight"].shape
    torch.Size([3, 8, 1])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from .inner_loop import LossFn, Params, forward
from .planner import vmap_exact
from .task_batched import per_task_losses, stacked_params, task_batched_forward

__all__ = ["task_gradients"]


def task_gradients(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn, *,
                   create_graph: bool = False) -> Params:
    """Per-task gradients of `loss_fn(model(params; x[t]), y[t])` w.r.t. `params`: `(T, *p.shape)`
    (see the module docstring for how they run)."""
    names = list(params)
    with torch.enable_grad():
        batched = task_batched_forward(model) if x.dim() == 5 else None
        if batched is not None:
            stacked = stacked_params(params, x.shape[0])
            losses = per_task_losses(loss_fn)(batched(stacked, x), y)
            grads = torch.autograd.grad(losses.sum(), [stacked[n] for n in names], create_graph=create_graph,
                                        allow_unused=True, materialize_grads=True)
            return dict(zip(names, grads))
        if vmap_exact(model):
            grads = vmap(lambda xt, yt: grad(lambda p: loss_fn(forward(model, p, xt), yt))(params))(x, y)
            return grads if create_graph else {n: g.detach() for n, g in grads.items()}
        rows = [_one_task(model, params, x[t], y[t], loss_fn, create_graph) for t in range(x.shape[0])]
        return {n: torch.stack([row[n] for row in rows]) for n in names}


def _one_task(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn, create_graph: bool) -> Params:
    loss = loss_fn(forward(model, params, x), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True,
                                materialize_grads=True)
    return dict(zip(params, grads))
