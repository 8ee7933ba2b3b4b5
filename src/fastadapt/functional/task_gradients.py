"""Every task's gradient at the same parameters, all tasks at once where that is exact.

`task_gradients(model, params, x, y, loss_fn)` is `grad loss_fn(model(params; x[t]), y[t])` for
each task t, stacked `(T, *p.shape)`: what an inference step from shared parameters needs
(PLATIPUS's `mu - gamma * grad`). Every entry of `params` is differentiated (whether or not it
requires grad); `frozen` entries enter the forward as constants. With `create_graph` the
gradients are differentiable, to second order, in `params` and whatever made them. It runs

- as one grouped-convolution graph for a conv/BatchNorm/ReLU/pool/Linear chain
  (`task_batched_forward`: each task's own BatchNorm statistics, exactly), the parameters
  expanded per task and differentiated through the expansion;
- under `torch.func.vmap` (with `torch.func.grad`; random layers draw per task) for a model whose
  layers all have exact vmap rules (`vmap_exact`);
- otherwise task by task: the reference, for every model.

`loss_fn(outputs, targets)` runs under vmap on the first two paths: built-in losses are fine.
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
                   frozen: Params | None = None, create_graph: bool = False) -> Params:
    """Per-task gradients of `loss_fn(model({**params, **frozen}; x[t]), y[t])` w.r.t. each entry of
    `params`: `(T, *p.shape)` (see the module docstring for how they run).

    Example:
        >>> from fastadapt.nn import MLP
        >>> model = MLP(1, [8], 1)
        >>> params = dict(model.named_parameters())
        >>> grads = task_gradients(model, params, torch.rand(3, 5, 1), torch.rand(3, 5, 1), torch.nn.functional.mse_loss)
        >>> grads["features.0.weight"].shape
        torch.Size([3, 8, 1])
    """
    frozen = dict(frozen or {})
    with torch.enable_grad():
        variables = {n: p if create_graph and p.requires_grad else p.detach().requires_grad_()
                     for n, p in params.items()}
        batched = task_batched_forward(model) if x.dim() == 5 else None
        if batched is not None:
            stacked = stacked_params({**variables, **frozen}, x.shape[0])
            losses = per_task_losses(loss_fn)(batched(stacked, x), y)
            grads = torch.autograd.grad(losses.sum(), [stacked[n] for n in variables], create_graph=create_graph,
                                        allow_unused=True, materialize_grads=True)
            return dict(zip(variables, grads))
        if vmap_exact(model):
            def one(xt: Tensor, yt: Tensor) -> Params:
                return grad(lambda p: loss_fn(forward(model, {**p, **frozen}, xt), yt))(variables)
            grads = vmap(one, randomness="different")(x, y)
            return grads if create_graph else {n: g.detach() for n, g in grads.items()}
        rows = []
        for t in range(x.shape[0]):
            loss = loss_fn(forward(model, {**variables, **frozen}, x[t]), y[t])
            rows.append(torch.autograd.grad(loss, list(variables.values()), create_graph=create_graph,
                                            allow_unused=True, materialize_grads=True))
        return {n: torch.stack([row[i] for row in rows]) for i, n in enumerate(variables)}
