"""The functional inner loop: parameters as dicts, `functional_call` and `torch.func.grad`.

The user's module is only ever *called* with parameter dicts; nothing is written into it.
"""

from __future__ import annotations

from typing import Callable, Mapping

from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from .fused_block import fused_forward

__all__ = ["Params", "LossFn", "forward", "inner_adapt"]

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Runs `model` on `x` with `params` in place of its parameters (buffers stay the module's).

    A recognised first conv block runs reordered (`functional.fused_block`), same result.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1)
        >>> forward(m, {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, torch.ones(1, 2))
        tensor([[2.]])
    """
    fast = fused_forward(model)
    if fast is not None:
        return fast(dict(params), x)
    return functional_call(model, dict(params), (x,), strict=False)


def inner_adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    steps: int,
    step_sizes: Mapping[str, Tensor | float],
    first_order: bool = False,
) -> tuple[Params, Tensor | None]:
    """`steps` SGD steps on the support loss for the parameters named in `step_sizes`.

    Returns the adapted parameter dict (untouched entries are the inputs themselves) and the
    support loss at the start. With `first_order`, the inner gradients are treated as constants
    (FOMAML); otherwise the result is differentiable through every step (second-order MAML).
    Works under `torch.no_grad()` too (evaluation): the inner gradients are still computed.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(1, 1)
        >>> p = {k: v.detach() for k, v in m.named_parameters()}
        >>> new, _ = inner_adapt(m, p, torch.ones(4, 1), torch.zeros(4, 1), loss_fn=torch.nn.functional.mse_loss,
        ...                      steps=1, step_sizes={"weight": 0.1, "bias": 0.1})
        >>> sorted(new)
        ['bias', 'weight']
    """
    adapted = {name: params[name] for name in step_sizes}
    frozen = {name: p for name, p in params.items() if name not in step_sizes}
    if first_order:
        frozen_for_grad = {name: p.detach() for name, p in frozen.items()}
    else:
        frozen_for_grad = frozen

    # Buffers go in as explicit inputs: a BatchNorm that tracks running statistics updates them in
    # place (train mode, as in ordinary PyTorch training), which torch.func.grad only allows for inputs.
    buffers = dict(model.named_buffers())

    def support_loss(trainable: Params, buffers: Params) -> Tensor:
        return loss_fn(forward(model, {**frozen_for_grad, **buffers, **trainable}, x), y)

    first_loss = None
    for _ in range(steps):
        point = {name: p.detach() for name, p in adapted.items()} if first_order else adapted
        grads, loss = grad_and_value(support_loss)(point, buffers)
        if first_loss is None:
            first_loss = loss
        adapted = {name: p - step_sizes[name] * grads[name] for name, p in adapted.items()}
    return {**frozen, **adapted}, first_loss
