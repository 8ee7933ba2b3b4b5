"""Meta-gradients in two passes: a first-order query pass, then a backward through the inner loop.

After adaptation `θ' = adapt(θ)`, the meta-gradient of the query loss is `J(θ)ᵀ ∇L_q(θ')`.
`∇L_q(θ')` is an ordinary first-order gradient on the query set, the expensive part (15 queries
per class against 1 support example on Omniglot 5w1s: 83% of a MAML step, measured), so it can
run compiled (`torch.compile` cannot differentiate a `create_graph` backward, but this pass has
none) or under bf16 autocast. `Jᵀ v` then runs backward through the small support-set loop only.
Exact: the same products as one backward through the whole graph, summed in another order.

With `checkpoint=True` the inner loop keeps no graph, only each step's parameter values; each
step's graph is rebuilt during the backward, so memory does not grow with the number of steps
(one extra support forward and backward per step).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .inner_loop import LossFn, Params, StepHooks, forward, inner_adapt, inner_trajectory, resolve_inner
from .optim import GradientTransformation
from .taskwise import add_gradients, place_gradients

__all__ = ["QueryPass", "split_meta_gradients", "mixed_precision", "check_step_weights"]


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

    def __call__(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Params]:
        """Returns the detached output and loss, and the gradient of the loss for every entry."""
        leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
        with torch.enable_grad():
            loss, output = self._loss_and_output(leaves, x, y)
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


def split_meta_gradients(
    model: nn.Module,
    params: Params,
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    *,
    loss_fn: LossFn,
    steps: int,
    step_sizes: Mapping[str, Tensor | float] | None = None,
    first_order: bool,
    query_pass: QueryPass,
    wrt: Sequence[Tensor],
    scale: float = 1.0,
    checkpoint: bool = False,
    autocast_dtype: torch.dtype | None = None,
    optimizer: GradientTransformation | None = None,
    names: Sequence[str] | None = None,
    hooks: StepHooks | None = None,
    step_weights: Sequence[float] | None = None,
) -> tuple[list[Tensor | None], Tensor, Tensor, Tensor | None]:
    """`scale *` the meta-gradient of one task's query loss w.r.t. `wrt`, plus what it was computed from.

    `wrt` lists the tensors to differentiate (meta-parameters, learned step sizes). The inner loop
    is plain SGD at `step_sizes`, or `optimizer` over `names` (see `inner_adapt`). With
    `step_weights` (w_1 .. w_steps) the query loss is MAML++'s multi-step loss `sum_i w_i L_q(θ_i)`,
    one first-order query pass per point with w_i > 0 and still one backward through the inner
    loop. Returns the gradients (None where a tensor does not influence the loss), the query output
    after the last step, the (weighted) query loss, both detached, and the support loss before
    adaptation.

    Example:
        >>> m = torch.nn.Linear(1, 1)
        >>> p = dict(m.named_parameters())
        >>> grads, _, loss, _ = split_meta_gradients(
        ...     m, p, (torch.ones(4, 1), torch.zeros(4, 1)), (torch.ones(4, 1), torch.zeros(4, 1)),
        ...     loss_fn=torch.nn.functional.mse_loss, steps=1, step_sizes={"weight": 0.1, "bias": 0.1},
        ...     first_order=False, query_pass=QueryPass(m, torch.nn.functional.mse_loss), wrt=list(p.values()))
        >>> [g.shape for g in grads]
        [torch.Size([1, 1]), torch.Size([1])]
    """
    names, optimizer = resolve_inner(step_sizes, optimizer, names)
    weights = check_step_weights(step_weights, steps)
    if checkpoint and not first_order:
        if step_sizes is None or hooks is not None or step_weights is not None:
            raise ValueError("the checkpointed inner loop supports plain SGD at step_sizes only "
                             "(no inner optimizer, step hooks or multi-step loss)")
        adapt: Callable[..., tuple[Params, Tensor | None]] = lambda start, n, fo: inner_adapt(  # noqa: E731
            model, start, *support, loss_fn=loss_fn, steps=n, step_sizes=step_sizes, first_order=fo)
        with torch.enable_grad(), mixed_precision(autocast_dtype):
            with torch.no_grad():
                trajectory, support_loss = _trajectory(adapt, params, steps)
            output, loss, query_grads = query_pass(trajectory[-1], *query)
            grads = _backward_checkpointed(adapt, params, names, trajectory, query_grads, wrt, scale)
        return grads, output, loss, support_loss
    with torch.enable_grad(), mixed_precision(autocast_dtype):
        points, support_loss = inner_trajectory(model, params, *support, loss_fn=loss_fn, steps=steps,
                                                first_order=first_order, optimizer=optimizer, names=names, hooks=hooks)
        outputs, grad_outputs, total = [], [], None
        for step, weight in enumerate(weights, start=1):
            if weight == 0 and step < steps:
                continue
            at = {**points[step], **(hooks.params(step) if hooks is not None else {})}
            with hooks.context(step) if hooks is not None else contextlib.nullcontext():
                output, loss, query_grads = query_pass(at, *query)
            total = weight * loss if total is None else total + weight * loss
            differentiable = [n for n, p in at.items() if p.requires_grad]
            outputs += [at[n] for n in differentiable]
            grad_outputs += [query_grads[n] * (scale * weight) for n in differentiable]
        grads = list(torch.autograd.grad(outputs, list(wrt), grad_outputs=grad_outputs, allow_unused=True))
    return grads, output, total, support_loss


def check_step_weights(step_weights: Sequence[float] | None, steps: int) -> list[float]:
    """The multi-step loss weights w_1 .. w_steps; None is the plain loss after the last step."""
    if step_weights is None:
        return [0.0] * (steps - 1) + [1.0]
    weights = [float(w) for w in step_weights]
    if len(weights) != steps or any(w < 0 for w in weights):
        raise ValueError(f"step_weights must be {steps} numbers >= 0 (one per inner step), got {list(step_weights)}")
    return weights


def _trajectory(adapt: Callable[..., tuple[Params, Tensor | None]], params: Params, steps: int
                ) -> tuple[list[Params], Tensor | None]:
    """Detached parameter dicts θ_0 .. θ_steps of the inner loop, and the first support loss."""
    points = [{n: p.detach() for n, p in params.items()}]
    first_loss = None
    for _ in range(steps):
        nxt, loss = adapt(points[-1], 1, True)
        points.append({n: p.detach() for n, p in nxt.items()})
        first_loss = loss if first_loss is None else first_loss
    return points, first_loss


def _backward_checkpointed(adapt: Callable[..., tuple[Params, Tensor | None]], params: Params,
                           adapted_names: list[str], trajectory: list[Params], query_grads: Params,
                           wrt: Sequence[Tensor], scale: float) -> list[Tensor | None]:
    """Jᵀv step by step from the last inner step to the first, rebuilding one step's graph at a time."""
    frozen = {n: p for n, p in params.items() if n not in adapted_names}
    totals = place_gradients({name: query_grads[name] * scale for name in frozen}, params, wrt)
    v = [query_grads[n] * scale for n in adapted_names]
    for point in reversed(trajectory[:-1]):
        leaves = {n: point[n].detach().requires_grad_() for n in adapted_names}
        nxt, _ = adapt({**frozen, **leaves}, 1, False)
        result = torch.autograd.grad([nxt[n] for n in adapted_names], [*leaves.values(), *wrt],
                                     grad_outputs=v, allow_unused=True)
        v = list(result[: len(leaves)])
        totals = add_gradients(totals, result[len(leaves):])
    return add_gradients(totals, place_gradients(dict(zip(adapted_names, v)), params, wrt))

