"""Meta-gradient rules over the inner loop's trajectory, for a meta-batch run in task groups.

After adaptation `θ' = adapt(θ)`, the meta-gradient of the query loss is `J(θ)ᵀ ∇L_q(θ')`. Both
rules here take `∇L_q(θ')` as an ordinary first-order gradient on the query set (the expensive
part: 15 queries per class against 1 support example on Omniglot 5w1s), task by task, optionally
compiled or under bf16 autocast (`functional.query_pass.QueryPass`), then apply `Jᵀ` by a backward
through the small support-set inner loop only:

- **unrolled**: the trajectory keeps its graph (second order through every step, or first order
  with the inner gradients as constants); one backward through it.
- **checkpointed** (second order): the trajectory keeps only each step's values (parameters and
  optimizer state); each step's graph is rebuilt during the backward, from the last step to the
  first, so memory does not grow with the number of inner steps (one extra support forward and
  backward per step). Any optimizer, per-step parameters and the multi-step loss included.

Exact: the same products as one backward through the whole graph, summed in another order.

The two rules that need no trajectory graph: **Reptile's direction** (`reptile_direction`,
`θ - mean_t φ_t`, first order by construction) and the **implicit** rule of iMAML
(`functional.implicit.implicit_meta_gradient`: conjugate gradient on Hessian-vector products at
the adapted point). Each learner is a choice among these four over the one inner loop.

Tasks go in groups: a group's support phase runs as one graph of stacked weights `(T, ...)`
(`functional.task_batched`: a grouped convolution, or a loop over the tasks for any model), the
groups one after another or `workers` at once in threads. The sum over groups keeps their order,
so the result does not depend on the workers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..data.episodes import TaskBatch
from ..runtime import map_in_threads
from .inner_loop import LossFn, Params, StepHooks, SupportLoss, adapt, check_step_params
from .optim import GradientTransformation, per_task
from .query_pass import QueryPass, check_step_weights, mixed_precision
from .seams import Seams
from .task_batched import BatchedForward, per_task_losses, stacked_params
from .taskwise import add_gradients

__all__ = ["meta_gradients", "reptile_direction"]


def meta_gradients(
    run: BatchedForward,
    params: Params,
    batch: TaskBatch,
    *,
    loss_fn: LossFn,
    steps: int,
    optimizer: GradientTransformation,
    names: Sequence[str],
    first_order: bool,
    query_pass: QueryPass,
    wrt: Sequence[Tensor],
    group: int,
    autocast_dtype: torch.dtype | None = None,
    checkpoint: bool = False,
    hooks: StepHooks | None = None,
    replay_hooks: StepHooks | None = None,
    step_weights: Sequence[float] | None = None,
    workers: int = 1,
    vmap_loss: bool = True,
    seams: Seams = Seams(),
    initial: Params | None = None,
    support_loss_fn: LossFn | None = None,
) -> tuple[list[Tensor | None], list[Tensor], Tensor, Tensor]:
    """The mean over tasks of the meta-gradient w.r.t. `wrt`, plus per-task query outputs, query
    losses `(T,)` and support losses before adapting `(T,)`.

    `run(stacked_params, x)` computes the tasks of a group (`task_batched.task_batched_forward` or
    `looped_forward`); `optimizer` over the parameters `names` is the inner loop (per task:
    `optim.per_task`); `hooks` are per-step parameters and contexts (MAML++'s per-step BatchNorm);
    `step_weights` (w_1 .. w_steps) make the query loss the multi-step loss `sum_i w_i L_q(θ_i)`.
    `vmap_loss=False` calls `loss_fn` task by task in a group (a loss that is not vmap-safe).
    `support_loss_fn` (default `loss_fn`, whose query loss `query_pass` computes) is the inner loss.
    `seams` are the learner's per-task additions (`functional.seams`); `initial` gives some
    parameters per task, `(T, *p.shape)`, in place of the shared initialisation: their gradients
    come back after those of `wrt`, one per entry of `initial` (the caller deposits them into the
    tensors `initial` was made from, so nothing is counted twice).
    `checkpoint` (second order only) selects the checkpointed rule, which replays each step with
    `replay_hooks` (default `hooks`; hooks that must not act twice, such as running statistics,
    give a form that does not update).

    Example:
        >>> from torch import nn
        >>> from fastadapt.functional.optim import sgd
        >>> from fastadapt.functional.task_batched import looped_forward
        >>> m = nn.Linear(2, 1)
        >>> p = dict(m.named_parameters())
        >>> batch = TaskBatch(*(torch.ones(3, 4, k) for k in (2, 1, 2, 1)))
        >>> grads, outputs, _, _ = meta_gradients(
        ...     looped_forward(m), p, batch, loss_fn=nn.functional.mse_loss, steps=2, optimizer=sgd(0.1),
        ...     names=list(p), first_order=False, query_pass=QueryPass(m, nn.functional.mse_loss), wrt=list(p.values()),
        ...     group=2)
        >>> [g.shape for g in grads], len(outputs)
        ([torch.Size([1, 2]), torch.Size([1])], 3)
    """
    names = list(names)
    if hooks is not None:
        check_step_params(hooks, names)
    weights = check_step_weights(step_weights, steps)
    rule = _checkpointed if checkpoint and not first_order else _unrolled
    each_task = per_task(optimizer)
    leaves = {n: t.detach().requires_grad_() for n, t in (initial or {}).items()}  # cut from what made them
    targets = [*wrt, *leaves.values()]
    per_task_loss = per_task_losses(support_loss_fn or loss_fn, vmap_loss and support_loss_fn is None)
    parts = batch.split(group)
    offsets = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]

    def one_group(index: int):
        part = parts[index]
        start = {n: t[offsets[index]: offsets[index] + len(part)] for n, t in leaves.items()}
        made = _Group(run, params, part, names, per_task_loss, query_pass, hooks, autocast_dtype, seams, start)
        if rule is _checkpointed:
            replay = _Group(run, params, part, names, per_task_loss, query_pass, replay_hooks or hooks, autocast_dtype,
                            seams, start)
            return _checkpointed(made, replay, each_task, steps, targets, weights, len(batch))
        return _unrolled(made, each_task, steps, first_order, targets, weights, len(batch))

    totals: list[Tensor | None] | None = None
    outputs: list[Tensor] = []
    query_losses, support_losses = [], []
    for grads, part_outputs, part_query, part_support in map_in_threads(one_group, range(len(parts)), workers):
        totals = add_gradients(totals, grads)
        outputs += part_outputs
        query_losses.append(part_query)
        support_losses.append(part_support)
    return totals or [], outputs, torch.cat(query_losses), torch.cat(support_losses)


class _Group:
    """One task group: its stacked starting point, support loss and query passes."""

    def __init__(self, run: BatchedForward, params: Params, part: TaskBatch, names: list[str],
                 per_task_loss: Callable[[Tensor, Tensor], Tensor], query_pass: QueryPass, hooks: StepHooks | None,
                 autocast_dtype: torch.dtype | None, seams: Seams, initial: Params) -> None:
        self.part, self.names, self.query_pass, self.hooks, self.seams = part, names, query_pass, hooks, seams
        self.tasks = len(part)
        stacked = {**stacked_params(params, self.tasks), **initial}
        self.start = {n: stacked[n] for n in names}
        self.frozen = {n: p for n, p in stacked.items() if n not in self.start}

        def support_loss(adapted: Params, step: int) -> Tensor:
            at = self.at(adapted, step)
            x = seams.stacked_support_inputs(at, part.support_x, part.support_y)
            with self.context(step), mixed_precision(autocast_dtype):
                losses = per_task_loss(run(at, x), part.support_y)
            return losses + seams.stacked_inner(at, step, self.tasks)

        self.support_loss: SupportLoss = support_loss

    def at(self, adapted: Params, step: int) -> Params:
        """The whole parameter dict at inner step `step`: frozen, per-step and adapted entries."""
        extra = stacked_params(self.hooks.params(step), self.tasks) if self.hooks is not None else {}
        return {**self.frozen, **extra, **adapted}

    def context(self, step: int) -> contextlib.AbstractContextManager:
        return self.hooks.context(step) if self.hooks is not None else contextlib.nullcontext()

    def query_passes(self, point: Params, step: int, last: bool) -> tuple[list[Tensor], Tensor, Params]:
        """Per-task first-order query passes at the parameters `point` of step `step`: outputs,
        losses `(T,)` and gradients stacked `(T, *p.shape)` for every entry of `point`. The query
        hook applies at every point, the outer and query terms at the `last` one (the outer term's
        gradient w.r.t. the adapted parameters here, the rest in `outer_direct`)."""
        outputs, losses, grads = [], [], []
        seams = self.seams
        for t in range(self.tasks):
            x, y = self.part.query_x[t], self.part.query_y[t]
            inputs = (lambda p, x=x, y=y: seams.query_inputs(p, x, y)) if seams.query_hook is not None else None
            initial = self.initial_of(t)
            extra = ((lambda p, x=x, y=y, initial=initial: seams.outer(p, {n: v.detach() for n, v in initial.items()})
                      + seams.query(p, x, y))
                     if last and (seams.outer_term is not None or seams.query_term is not None) else None)
            with self.context(step):
                output, loss, g = self.query_pass({n: p[t] for n, p in point.items()}, x, y, inputs=inputs,
                                                  extra=extra)
            outputs.append(output)
            losses.append(loss)
            grads.append(g)
        return outputs, torch.stack(losses), {n: torch.stack([g[n] for g in grads]) for n in grads[0]}

    def initial_of(self, task: int) -> Params:
        """Task `task`'s whole initial parameter dict (with its graph to the meta-parameters)."""
        return {n: p[task] for n, p in self.at(self.start, 0).items()}

    def outer_direct(self, adapted: Params, targets: list[Tensor], scale: float) -> list[Tensor | None] | None:
        """The outer term's gradient w.r.t. `targets` through the initial parameters, the adapted
        ones held fixed (`query_passes` took the rest): None without an outer term."""
        if self.seams.outer_term is None:
            return None
        term = sum(self.seams.outer_term({n: p[t].detach() for n, p in adapted.items()}, self.initial_of(t))
                   for t in range(self.tasks))
        if not isinstance(term, Tensor) or not term.requires_grad:
            return None
        return list(torch.autograd.grad(term * scale, targets, allow_unused=True))


def _weighted_steps(weights: list[float]) -> list[tuple[int, float]]:
    """The steps whose query loss counts (w_i > 0, and always the last, for the outputs)."""
    return [(step, w) for step, w in enumerate(weights, start=1) if w > 0 or step == len(weights)]


def _unrolled(group: _Group, optimizer: GradientTransformation, steps: int, first_order: bool, wrt: list[Tensor],
              weights: list[float], total_tasks: int):
    with torch.enable_grad():
        trajectory = adapt(group.support_loss, group.start, optimizer=optimizer, steps=steps, first_order=first_order)
        targets, grad_outputs, query_losses = [], [], None
        for step, weight in _weighted_steps(weights):
            at = group.at(trajectory.points[step], step)
            outputs, losses, query_grads = group.query_passes(at, step, last=step == steps)
            query_losses = weight * losses if query_losses is None else query_losses + weight * losses
            differentiable = [n for n, p in at.items() if p.requires_grad]
            targets += [at[n] for n in differentiable]
            grad_outputs += [query_grads[n] * (weight / total_tasks) for n in differentiable]
        meta_grads = add_gradients(list(torch.autograd.grad(targets, wrt, grad_outputs, allow_unused=True)),
                                   group.outer_direct(at, wrt, 1 / total_tasks) or [None] * len(wrt))
    return meta_grads, outputs, query_losses, trajectory.losses[0]


def _checkpointed(group: _Group, replay: _Group, optimizer: GradientTransformation, steps: int,
                  wrt: list[Tensor], weights: list[float], total_tasks: int):
    names = group.names
    with torch.enable_grad():
        # forward: each step's values only (parameters and optimizer state), no graph
        values: list[tuple[Params, Any]] = [({n: p.detach() for n, p in group.start.items()}, optimizer.init(group.start))]
        support_losses = None
        for _ in range(steps):
            point, state = values[-1]
            step = adapt(group.support_loss, point, optimizer=optimizer, steps=1, keep_graph=False,
                         state=state, first_step=len(values) - 1)
            values.append((step.points[1], step.state))
            support_losses = step.losses[0] if support_losses is None else support_losses
        # the query passes; their gradients for entries that do not adapt go straight to `wrt`
        cotangents: dict[int, list[Tensor]] = {}
        totals: list[Tensor | None] | None = None
        query_losses = None
        for step, weight in _weighted_steps(weights):
            at = group.at(values[step][0], step)
            outputs, losses, query_grads = group.query_passes(at, step, last=step == steps)
            query_losses = weight * losses if query_losses is None else query_losses + weight * losses
            cotangents[step] = [query_grads[n] * (weight / total_tasks) for n in names]
            direct = [n for n, p in at.items() if n not in names and p.requires_grad]
            if direct:
                totals = add_gradients(totals, torch.autograd.grad(
                    [at[n] for n in direct], wrt, [query_grads[n] * (weight / total_tasks) for n in direct],
                    allow_unused=True))
        totals = add_gradients(totals, group.outer_direct(at, wrt, 1 / total_tasks) or [None] * len(wrt))
        # backward: one step's graph at a time, from the last step to the first
        v_point, v_state = cotangents[steps], None
        for k in reversed(range(steps)):
            point, state = values[k]
            leaves = group.start if k == 0 else {n: p.clone().requires_grad_() for n, p in point.items()}
            state_leaves, spec = _state_leaves(state)
            rebuilt = adapt(replay.support_loss, leaves, optimizer=optimizer, steps=1,
                            state=pytree.tree_unflatten(state_leaves, spec), first_step=k)
            new_state = [t for t in pytree.tree_leaves(rebuilt.state) if isinstance(t, Tensor)]
            outs = [rebuilt.points[1][n] for n in names] + new_state
            cots = v_point + (v_state if v_state is not None else [torch.zeros_like(t) for t in new_state])
            pairs = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
            inputs = ([] if k == 0 else [leaves[n] for n in names]) + [t for t in state_leaves if isinstance(t, Tensor)]
            result = torch.autograd.grad([o for o, _ in pairs], [*inputs, *wrt], [c for _, c in pairs],
                                         allow_unused=True, materialize_grads=False)
            totals = add_gradients(totals, list(result[len(inputs):]))
            if k > 0:
                v_point = [_or_zero(g, point[n]) for g, n in zip(result[: len(names)], names)]
                if k in cotangents:
                    v_point = [a + b for a, b in zip(v_point, cotangents[k])]
                v_state = [_or_zero(g, t) for g, t in zip(result[len(names): len(inputs)], inputs[len(names):])]
    return totals or [None] * len(wrt), outputs, query_losses, support_losses


def _state_leaves(state: Any) -> tuple[list[Any], Any]:
    """The optimizer state's leaves, its tensors as fresh leaves that require grad, and its spec."""
    leaves, spec = pytree.tree_flatten(state)
    return [t.detach().clone().requires_grad_() if isinstance(t, Tensor) and t.is_floating_point() else t
            for t in leaves], spec


def _or_zero(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad



def reptile_direction(start: Params, adapted: Params, names: Sequence[str]) -> list[Tensor]:
    """Reptile's meta-gradient for `names`: `start - mean over tasks of adapted` (the tasks stacked
    on the leading dimension of `adapted`), so that an outer SGD step with learning rate ε moves
    the initialisation by ε toward the tasks' adapted weights.

    Example:
        >>> reptile_direction({"w": torch.zeros(2)}, {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, ["w"])
        [tensor([-2., -3.])]
    """
    return [start[name].detach() - adapted[name].detach().mean(0) for name in names]
