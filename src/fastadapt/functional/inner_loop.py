"""The functional inner loop: parameters as dicts, `functional_call` and `torch.func.grad`.

The user's module is only ever *called* with parameter dicts; nothing is written into it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping, Protocol, Sequence

from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from .fused_block import fused_forward
from .optim import GradientTransformation, apply_updates, sgd

__all__ = ["Params", "LossFn", "StepHooks", "forward", "inner_adapt", "inner_trajectory", "resolve_inner"]

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class StepHooks(Protocol):
    """Per-step changes to the forward at the parameters of inner step `s` (0 = before adapting).

    `params(s)` adds or replaces entries (never adapted ones) of the parameter dict, e.g. MAML++'s
    per-step BatchNorm weights; `context(s)` is entered around each such forward, e.g. per-step
    BatchNorm statistics (`functional.step_norm`).
    """

    def params(self, step: int) -> Mapping[str, Tensor]: ...

    def context(self, step: int) -> contextlib.AbstractContextManager: ...


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


def resolve_inner(step_sizes: Mapping[str, Tensor | float] | None, optimizer: GradientTransformation | None,
                  names: Sequence[str] | None) -> tuple[list[str], GradientTransformation]:
    """The adapted parameter names and the optimizer, from `step_sizes` (plain SGD, its keys the
    names) or from `optimizer` with `names`; exactly one of the two forms.

    Example:
        >>> resolve_inner({"w": 0.1}, None, None)[0]
        ['w']
    """
    if (step_sizes is None) == (optimizer is None):
        raise ValueError("give either step_sizes (plain SGD) or optimizer with names, not both or neither")
    if optimizer is not None:
        if names is None:
            raise ValueError("an inner optimizer needs names: the parameters it adapts")
        return list(names), optimizer
    if names is not None:
        raise ValueError("names go with optimizer; step_sizes already names the adapted parameters")
    return list(step_sizes), sgd(dict(step_sizes))  # type: ignore[arg-type]


def inner_adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    steps: int,
    step_sizes: Mapping[str, Tensor | float] | None = None,
    first_order: bool = False,
    optimizer: GradientTransformation | None = None,
    names: Sequence[str] | None = None,
    hooks: StepHooks | None = None,
) -> tuple[Params, Tensor | None]:
    """`steps` optimizer steps on the support loss; plain SGD at `step_sizes` by default.

    The parameters named in `step_sizes` (or `names`, with an `optimizer` from
    `functional.optim`) adapt. Returns the adapted parameter dict (untouched entries are the
    inputs themselves) and the support loss at the start. With `first_order`, the inner
    gradients are treated as constants (FOMAML); otherwise the result is differentiable through
    every step (second-order MAML). Works under `torch.no_grad()` too (evaluation): the inner
    gradients are still computed.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(1, 1)
        >>> p = {k: v.detach() for k, v in m.named_parameters()}
        >>> new, _ = inner_adapt(m, p, torch.ones(4, 1), torch.zeros(4, 1), loss_fn=torch.nn.functional.mse_loss,
        ...                      steps=1, step_sizes={"weight": 0.1, "bias": 0.1})
        >>> sorted(new)
        ['bias', 'weight']
    """
    points, first_loss = inner_trajectory(model, params, x, y, loss_fn=loss_fn, steps=steps, step_sizes=step_sizes,
                                          first_order=first_order, optimizer=optimizer, names=names, hooks=hooks)
    return points[-1], first_loss


def inner_trajectory(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    steps: int,
    step_sizes: Mapping[str, Tensor | float] | None = None,
    first_order: bool = False,
    optimizer: GradientTransformation | None = None,
    names: Sequence[str] | None = None,
    hooks: StepHooks | None = None,
) -> tuple[list[Params], Tensor | None]:
    """`inner_adapt`, returning every point of the loop: parameter dicts θ_0 (the input) .. θ_steps.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(1, 1)
        >>> p = {k: v.detach() for k, v in m.named_parameters()}
        >>> points, _ = inner_trajectory(m, p, torch.ones(4, 1), torch.zeros(4, 1),
        ...                              loss_fn=torch.nn.functional.mse_loss, steps=2, step_sizes={"bias": 0.1})
        >>> len(points), points[0]["bias"] is p["bias"]
        (3, True)
    """
    names, optimizer = resolve_inner(step_sizes, optimizer, names)
    adapted = {name: params[name] for name in names}
    frozen = {name: p for name, p in params.items() if name not in adapted}
    # Buffers go in as explicit inputs: a BatchNorm that tracks running statistics updates them in
    # place (train mode, as in ordinary PyTorch training), which torch.func.grad only allows for inputs.
    buffers = dict(model.named_buffers())
    state = optimizer.init(adapted)

    points = [dict(params)]
    first_loss = None
    for step in range(steps):
        fixed = {**frozen, **_step_params(hooks, step, adapted)}
        if first_order:
            fixed = {name: p.detach() for name, p in fixed.items()}

        def support_loss(trainable: Params, buffers: Params, fixed: Params = fixed) -> Tensor:
            return loss_fn(forward(model, {**fixed, **buffers, **trainable}, x), y)

        point = {name: p.detach() for name, p in adapted.items()} if first_order else adapted
        with hooks.context(step) if hooks is not None else contextlib.nullcontext():
            grads, loss = grad_and_value(support_loss)(point, buffers)
        if first_loss is None:
            first_loss = loss
        updates, state = optimizer.update(grads, state, adapted)
        adapted = apply_updates(adapted, updates)
        points.append({**frozen, **adapted})
    return points, first_loss


def _step_params(hooks: StepHooks | None, step: int, adapted: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if hooks is None:
        return {}
    extra = hooks.params(step)
    clash = sorted(set(extra) & set(adapted))
    if clash:
        raise ValueError(f"step hooks replace parameter(s) {clash}, which the inner loop adapts")
    return extra
