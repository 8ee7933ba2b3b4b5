"""The one inner loop: `adapt` takes optimizer steps on a support loss and returns the trajectory.

Every learner and execution path adapts through it: MAML and its family (task by task, in task
groups, under vmap, checkpointed), MAML++, iMAML's inner solve, Reptile's fine-tuning, Baseline's
head fit and evaluation. What differs between them is the support loss it is given (which
forward, which inputs at which step, which extra terms), the optimizer (a gradient transformation,
`functional.optim`) and two switches: `first_order` (inner gradients as constants) and
`keep_graph` (False: no graph from one step to the next). `inner_step` is the step itself, also
behind `GradientLearner.clone().adapt(loss)`.

Parameters are dicts; the user's module is only ever *called* with them (`forward`), nothing is
written into it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from .fused_block import fused_forward
from .norm_relu_pool import under_vmap
from .optim import GradientTransformation, apply_updates

__all__ = ["Params", "LossFn", "SupportLoss", "StepHooks", "Trajectory", "forward", "adapt", "inner_step",
           "model_support_loss", "check_step_params"]

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
# the support loss at inner step `s` of the adapted entries: a scalar, or one per task `(T,)`
SupportLoss = Callable[[Params, int], Tensor]


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


class Trajectory(NamedTuple):
    """The points θ_0 (the start) .. θ_steps of the adapted entries, the support loss at θ_0 ..
    θ_(steps-1) (detached), and the optimizer's final state."""

    points: list[Params]
    losses: list[Tensor]
    state: Any


def adapt(support_loss: SupportLoss, params: Params, *, optimizer: GradientTransformation, steps: int,
          first_order: bool = False, keep_graph: bool = True, state: Any = None, first_step: int = 0) -> Trajectory:
    """`steps` steps of `optimizer` on `support_loss(point, step)` from `params` (the adapted entries).

    The loss may be one scalar or one per task `(T,)` for tasks stacked on the parameters' leading
    dimension (their sum is differentiated: each task gets its own gradient). With `keep_graph`
    the points are differentiable functions of `params` (and of learned rates), through every step
    (second order) or, with `first_order`, with the inner gradients as constants; without it no
    graph survives a step (Reptile, iMAML's solve, evaluation, checkpointing). `state` (None:
    `optimizer.init`) is where the optimizer starts, `first_step` the index the first step has (a
    loop resumed at step k, as checkpointing rebuilds it). Works under `torch.no_grad()` (the inner
    gradients are still taken) and under `torch.func.vmap` (there with `torch.func.grad`).

    Example:
        >>> from fastadapt.functional.optim import sgd
        >>> w = torch.tensor([1.0], requires_grad=True)
        >>> traj = adapt(lambda p, step: (p["w"] ** 2).sum(), {"w": w}, optimizer=sgd(0.25), steps=2)
        >>> traj.points[-1]["w"], len(traj.losses)
        (tensor([0.2500], grad_fn=<AddBackward0>), 2)
    """
    state = optimizer.init(params) if state is None else state
    keep_graph = keep_graph and torch.is_grad_enabled()  # (evaluation: no outer graph to keep)
    points, losses = [params], []
    point = params
    for step in range(first_step, first_step + steps):
        if under_vmap():
            at = {n: p.detach() for n, p in point.items()} if first_order else point
            grads, loss = grad_and_value(lambda p: support_loss(p, step).sum())(at)
            if first_order:  # constants also where they depend on the frozen entries
                grads = {n: g.detach() for n, g in grads.items()}
        else:
            with torch.enable_grad():
                point = {n: p if keep_graph and p.requires_grad else p.detach().requires_grad_() for n, p in point.items()}
                loss = support_loss(point, step)
                grads = dict(zip(point, torch.autograd.grad(loss.sum(), list(point.values()), allow_unused=True,
                                                            create_graph=keep_graph and not first_order,
                                                            materialize_grads=True)))
        point, state = inner_step(point, grads, state, optimizer, keep_graph=keep_graph)
        losses.append(loss.detach())
        points.append(point)
    return Trajectory(points, losses, state)


def inner_step(point: Params, grads: Params, state: Any, optimizer: GradientTransformation, *,
               keep_graph: bool = True) -> tuple[Params, Any]:
    """One step of `optimizer` from `point` with `grads`: the new point and state. With
    `keep_graph`, differentiable (through the update, the point and the gradients' own graph).

    Example:
        >>> from fastadapt.functional.optim import sgd
        >>> opt = sgd(0.5)
        >>> inner_step({"w": torch.ones(1)}, {"w": torch.ones(1)}, opt.init({}), opt)[0]
        {'w': tensor([0.5000])}
    """
    with contextlib.nullcontext() if keep_graph else torch.no_grad():
        base = point if keep_graph else {n: p.detach() for n, p in point.items()}
        updates, state = optimizer.update(grads, state, base)
        return apply_updates(base, updates), state


def model_support_loss(model: nn.Module, x: Tensor, y: Tensor, *, loss_fn: LossFn, frozen: Mapping[str, Tensor] = {},
                       hooks: StepHooks | None = None, seams: Any = None) -> SupportLoss:
    """The support loss of one task for `adapt`: `loss_fn(model(x; θ), y)` with the adapted entries,
    the `frozen` ones, and at step `s` the step hooks' parameters and context (MAML++), and the
    `seams` (`functional.seams.Seams`: a support hook, an inner term).

    Example:
        >>> from fastadapt.functional.optim import sgd
        >>> m = torch.nn.Linear(1, 1)
        >>> p = {k: v.detach() for k, v in m.named_parameters()}
        >>> loss = model_support_loss(m, torch.ones(4, 1), torch.zeros(4, 1), loss_fn=torch.nn.functional.mse_loss)
        >>> sorted(adapt(loss, p, optimizer=sgd(0.1), steps=1).points[-1])
        ['bias', 'weight']
    """
    def support_loss(adapted: Params, step: int) -> Tensor:
        params = {**frozen, **(hooks.params(step) if hooks is not None else {}), **adapted}
        inputs = x if seams is None else seams.support_inputs(params, x, y)
        with hooks.context(step) if hooks is not None else contextlib.nullcontext():
            loss = loss_fn(forward(model, params, inputs), y)
        return loss if seams is None else loss + seams.inner(params, step)

    return support_loss


def check_step_params(hooks: StepHooks, adapted: Sequence[str]) -> None:
    """Refuses step hooks that would replace parameters the inner loop adapts (meaningless: the
    replaced value would never be the adapted one).

    Example:
        >>> class Hooks:
        ...     def params(self, step): return {"w": torch.zeros(1)}
        >>> check_step_params(Hooks(), ["w"])
        Traceback (most recent call last):
        ...
        ValueError: step hooks replace parameter(s) ['w'], which the inner loop adapts
    """
    clash = sorted(set(hooks.params(0)) & set(adapted))
    if clash:
        raise ValueError(f"step hooks replace parameter(s) {clash}, which the inner loop adapts")
