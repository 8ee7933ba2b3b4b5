"""The support-set inner loop of all tasks at once: T weight sets in one grouped-convolution graph.

A support set is small (5 images on Omniglot 5w1s), so a per-task inner loop is bound by the cost
of launching hundreds of tiny operations, not by arithmetic (measured: the support phase ran no
faster on 2 threads than on 1). Here the T tasks' weights are stacked on a leading dimension and
the network runs once: convolutions as one grouped convolution (T groups), BatchNorm over T*C
channels (each task's own batch statistics, exactly), Linear as a batched matmul. The graph is
ordinary autograd, so second-order terms are exact; `torch.func.vmap` is not used (its batching
rules are wrong through BatchNorm in second order, see tests/test_meta_gradients.py).

Supported: any model whose forward is proven to be a chain of Conv2d, BatchNorm2d without running
statistics, ReLU, MaxPool2d, Flatten and Linear layers (`functional.structure`), whatever its
class: a `fastadapt.nn.Conv4` or a user's `nn.Sequential` of the same layers.
"""

from __future__ import annotations

import weakref
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from ..data.episodes import TaskBatch
from ..runtime import map_in_threads
from .fused_block import fused_forward, reorders_on, tasks_conv_bn_pool
from .structure import Chain, layer_chain
from .inner_loop import LossFn, Params, resolve_inner
from .norm_relu_pool import is_norm_relu_pool, norm_relu_pool
from .optim import GradientTransformation, apply_updates, per_task
from .split import QueryPass, check_step_weights, mixed_precision
from .taskwise import add_gradients, place_gradients

__all__ = ["task_batched_forward", "batched_meta_gradients", "per_task_losses", "stacked_params",
           "check_task_workers", "thread_safe_forward", "task_workers_for"]

BatchedForward = Callable[[Params, Tensor], Tensor]
# model -> (the chain the forward was built for, the forward)
_BUILT: "weakref.WeakKeyDictionary[nn.Module, tuple[Chain, BatchedForward]]" = weakref.WeakKeyDictionary()


def task_batched_forward(model: nn.Module) -> BatchedForward | None:
    """`run(params, x)`: params of shape `(T, *p.shape)`, `x` of shape `(T, N, C, H, W)` -> `(T, N, out)`.

    For any model whose forward is proven to be a chain of Conv2d, BatchNorm2d (batch statistics),
    ReLU, MaxPool2d, Flatten and (after the Flatten) Linear layers, whatever its class
    (`functional.structure.layer_chain`); None for others. Read again at every call, so a model
    edited since the last call gets its own function.

    Example:
        >>> from fastadapt.nn import Conv4
        >>> model = Conv4.omniglot(ways=5)
        >>> stacked = {n: p.expand(2, *p.shape) for n, p in model.named_parameters()}
        >>> x = torch.rand(2, 3, 1, 28, 28)
        >>> torch.allclose(task_batched_forward(model)(stacked, x)[1], model(x[1]), atol=1e-5)
        True
    """
    chain = layer_chain(model)
    if chain is None or not _batchable(chain):
        return None
    built = _BUILT.get(model)
    if built is None or built[0] is not chain:
        built = _BUILT[model] = (chain, _build_batched(chain, reorder=fused_forward(model) is not None))
    return built[1]


def _build_batched(chain: Chain, reorder: bool) -> BatchedForward:
    """The task-batched forward of `chain`, its first block reordered (on the CPU) with `reorder`."""
    layers = [(f"{name}.", m) for name, m in chain]
    eps = layers[1][1].eps if reorder else 0.0

    def run(params: Params, x: Tensor) -> Tensor:
        tasks, n = x.shape[:2]
        reordered = reorder and reorders_on(x)
        if reordered:
            h = tasks_conv_bn_pool(x, params[layers[0][0] + "weight"], params[layers[1][0] + "weight"],
                                   params[layers[1][0] + "bias"], eps)                # (T, N, C, H, W)
        else:
            h = x
        h = h.transpose(0, 1).reshape(n, tasks * h.shape[2], *h.shape[3:])          # (N, T*C, H, W)
        if reordered:  # the block's ReLU after the copy: it and the next conv save the same tensor
            h = F.relu(h)
        rest = layers[4 if reordered else 0:]
        on_cpu = reorders_on(x)
        flat = False
        i = 0
        while i < len(rest):
            prefix, m = rest[i]
            i += 1
            if on_cpu and is_norm_relu_pool([module for _, module in rest[i - 1:i + 2]]):
                h = norm_relu_pool(h, params[prefix + "weight"].reshape(-1), params[prefix + "bias"].reshape(-1), m.eps)
                i += 2
            elif isinstance(m, nn.Conv2d):
                w = params[prefix + "weight"]
                bias = params[prefix + "bias"].reshape(-1) if m.bias is not None else None
                h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), bias, m.stride, m.padding, m.dilation, groups=tasks)
            elif isinstance(m, nn.BatchNorm2d):
                h = F.batch_norm(h, None, None, params[prefix + "weight"].reshape(-1),
                                 params[prefix + "bias"].reshape(-1), True, 0.0, m.eps)
            elif isinstance(m, nn.ReLU):
                h = F.relu(h)
            elif isinstance(m, nn.MaxPool2d):
                h = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
            elif isinstance(m, nn.Flatten):
                h, flat = h.reshape(n, tasks, -1).transpose(0, 1), True                 # (T, N, D)
            elif m.bias is not None:  # nn.Linear on (T, N, D)
                h = torch.baddbmm(params[prefix + "bias"][:, None, :], h, params[prefix + "weight"].transpose(1, 2))
            else:
                h = torch.bmm(h, params[prefix + "weight"].transpose(1, 2))
        return h if flat else h.reshape(n, tasks, -1, *h.shape[2:]).transpose(0, 1)   # (T, N, C, H, W)

    return run


def thread_safe_forward(model: nn.Module) -> bool:
    """Whether `model`'s functional forward may run in several threads at once (now: its structure
    may change; learners check it at every call and run one worker otherwise).

    Example:
        >>> thread_safe_forward(nn.Linear(2, 1))
        False
    """
    return fused_forward(model) is not None


def task_workers_for(task_workers: int, model: nn.Module, batch: TaskBatch) -> int:
    """The workers a batch runs with: `task_workers` on the CPU for a model whose forward is (still)
    thread-safe, else 1 (the same numbers, one group at a time).

    Example:
        >>> task_workers_for(2, nn.Linear(2, 1), TaskBatch(*(torch.zeros(1, 1, 2) for _ in range(4))))
        1
    """
    on_cpu = batch.support_x.device.type == "cpu"
    return task_workers if task_workers > 1 and on_cpu and thread_safe_forward(model) else 1


def check_task_workers(task_workers: int, model: nn.Module) -> int:
    """`task_workers` (tasks or task groups at once in threads, `runtime.map_in_threads`),
    validated: an integer >= 1, above 1 only for a model whose forward is thread-safe (a model
    whose first block the reordered forward computes, `fused_block.fused_forward`, such as a
    Conv4 with max-pool blocks; other forwards swap the module's parameters via `functional_call`).

    Example:
        >>> from fastadapt.nn import Conv4
        >>> check_task_workers(2, Conv4.omniglot(ways=5))
        2
    """
    if isinstance(task_workers, bool) or not isinstance(task_workers, int) or task_workers < 1:
        raise ValueError(f"task_workers must be an integer >= 1, got {task_workers!r}")
    if task_workers > 1 and not thread_safe_forward(model):
        raise ValueError(f"task_workers > 1 needs a Conv4-style model with max-pool blocks (its forward is "
                         f"thread-safe), got {type(model).__name__}")
    return task_workers


def stacked_params(params: Params, tasks: int) -> Params:
    """Every tensor repeated for `tasks` tasks on a new leading dimension (views, no copies).

    Example:
        >>> stacked_params({"w": torch.zeros(3)}, 2)["w"].shape
        torch.Size([2, 3])
    """
    return {name: p.expand(tasks, *p.shape) for name, p in params.items()}


def _batchable(chain: Chain) -> bool:
    """Whether `_build_batched` computes `chain`: convolutions without groups and with explicit
    padding, one `Flatten(1, -1)` at most, Linear layers only after it."""
    flat = False
    for _, m in chain:
        if isinstance(m, nn.Conv2d) and not (m.groups == 1 and isinstance(m.padding, tuple)):
            return False
        if isinstance(m, nn.Flatten):
            if flat or (m.start_dim, m.end_dim) != (1, -1):
                return False
            flat = True
        if isinstance(m, nn.Linear) and not flat:
            return False
    return True


def batched_meta_gradients(
    run: BatchedForward,
    params: Params,
    batch: TaskBatch,
    *,
    loss_fn: LossFn,
    steps: int,
    step_sizes: Mapping[str, Tensor | float] | None = None,
    first_order: bool,
    query_pass: QueryPass,
    wrt: Sequence[Tensor],
    autocast_dtype: torch.dtype | None = None,
    group: int = 4,
    checkpoint: bool = False,
    optimizer: GradientTransformation | None = None,
    names: Sequence[str] | None = None,
    step_params: Callable[[int], Params] | None = None,
    step_weights: Sequence[float] | None = None,
    workers: int = 1,
) -> tuple[list[Tensor | None], list[Tensor], Tensor, Tensor]:
    """The mean over tasks of the meta-gradient w.r.t. `wrt`, plus per-task outputs, query and support losses.

    Tasks go in groups of `group`: the support phase of a group in one graph (`run`), its query
    passes task by task (first-order gradients, see `functional.split`), then one backward
    through the group's support graph. Memory grows with `group` (one group's support graph is
    alive at a time); speed saturates around 4 (measured, docs/performance.md). With
    `checkpoint` (second order), a group keeps only each inner step's parameter values and
    rebuilds one step's graph at a time during the backward: memory does not grow with `steps`.

    The inner loop is plain SGD at `step_sizes`, or `optimizer` over `names` (`functional.optim`;
    it updates each task's slice of the stacked `(T, ...)` weights on its own, `optim.per_task`).
    MAML++'s options: `step_params(s)` gives parameters that replace the model's own in the
    forwards at θ_s (per-step BatchNorm weights), and `step_weights` (w_1 .. w_steps) makes the
    query loss the multi-step loss `sum_i w_i L_q(θ_i)`, as in `functional.split`. The
    checkpointed form supports plain SGD only, without either.

    With `workers` > 1, that many groups run at once in Python threads with one intra-op thread
    each (`runtime.map_in_threads`); the sum over groups keeps their order, so the result is the
    same. Memory: that many groups' graphs are alive at once.
    """
    names, optimizer = resolve_inner(step_sizes, optimizer, names)
    if checkpoint and not first_order:
        given = [what for what, on in (("an inner optimizer", step_sizes is None),
                                       ("per-step parameters", step_params is not None),
                                       ("a multi-step loss", step_weights is not None)) if on]
        if given:
            raise ValueError(f"the checkpointed inner loop supports plain SGD at step_sizes only; got {', '.join(given)}")
    if step_params is not None:
        clash = sorted(set(step_params(0)) & set(names))
        if clash:
            raise ValueError(f"step_params replace parameter(s) {clash}, which the inner loop adapts")
    weights = check_step_weights(step_weights, steps)
    checkpointed = checkpoint and not first_order

    def one_group(part: TaskBatch):
        if checkpointed:
            return _group_checkpointed(run, params, part, loss_fn, steps, step_sizes, names, first_order, query_pass,
                                       wrt, autocast_dtype, len(batch))
        return _group_meta_gradients(run, params, part, loss_fn, steps, optimizer, names, first_order, query_pass,
                                     wrt, autocast_dtype, len(batch), step_params, weights)

    totals: list[Tensor | None] | None = None
    outputs: list[Tensor] = []
    query_losses, support_losses = [], []
    for grads, part_outputs, part_query, part_support in map_in_threads(one_group, batch.split(group), workers):
        totals = add_gradients(totals, grads)
        outputs += part_outputs
        query_losses.append(part_query)
        support_losses.append(part_support)
    return totals or [], outputs, torch.cat(query_losses), torch.cat(support_losses)


def _group_meta_gradients(run: BatchedForward, params: Params, batch: TaskBatch, loss_fn: LossFn, steps: int,
                          optimizer: GradientTransformation, names: list[str], first_order: bool, query_pass: QueryPass,
                          wrt: Sequence[Tensor], autocast_dtype: torch.dtype | None, total_tasks: int,
                          step_params: Callable[[int], Params] | None, weights: list[float]):
    tasks = len(batch)

    def at_step(point: Params, step: int) -> Params:
        return point if step_params is None else {**point, **stacked_params(step_params(step), tasks)}

    adapted = stacked_params(params, tasks)
    points = [adapted]
    per_task_loss = per_task_losses(loss_fn)
    each_task = per_task(optimizer)
    state = each_task.init({n: adapted[n] for n in names})
    support_losses = None
    with torch.enable_grad():
        for step in range(steps):
            with mixed_precision(autocast_dtype):
                losses = per_task_loss(run(at_step(adapted, step), batch.support_x), batch.support_y)
            support_losses = losses.detach() if support_losses is None else support_losses
            grads = torch.autograd.grad(losses.sum(), [adapted[n] for n in names], create_graph=not first_order,
                                        allow_unused=True, materialize_grads=True)
            current = {n: adapted[n] for n in names}
            updates, state = each_task.update({n: g.detach() if first_order else g for n, g in zip(names, grads)},
                                              state, current)
            adapted = {**adapted, **apply_updates(current, updates)}
            points.append(adapted)
        # one first-order query pass per weighted point, then one backward through the support graph
        targets, grad_outputs, query_losses = [], [], None
        for step, weight in enumerate(weights, start=1):
            if weight == 0 and step < steps:
                continue
            at = at_step(points[step], step)
            outputs, losses, query_grads = _query_passes(query_pass, at, batch)
            query_losses = weight * losses if query_losses is None else query_losses + weight * losses
            differentiable = [n for n, p in at.items() if p.requires_grad]
            targets += [at[n] for n in differentiable]
            grad_outputs += [query_grads[n] * (weight / total_tasks) for n in differentiable]
        meta_grads = torch.autograd.grad(targets, list(wrt), grad_outputs, allow_unused=True)
    return list(meta_grads), outputs, query_losses, support_losses


def _query_passes(query_pass: QueryPass, adapted: Params, batch: TaskBatch) -> tuple[list[Tensor], Tensor, Params]:
    """Per-task query passes; returns outputs, losses `(T,)` and gradients stacked `(T, *p.shape)`."""
    outputs, losses, grads = [], [], []
    for t in range(len(batch)):
        output, loss, g = query_pass({n: p[t] for n, p in adapted.items()}, batch.query_x[t], batch.query_y[t])
        outputs.append(output)
        losses.append(loss)
        grads.append(g)
    return outputs, torch.stack(losses), {n: torch.stack([g[n] for g in grads]) for n in grads[0]}


def _group_checkpointed(run: BatchedForward, params: Params, batch: TaskBatch, loss_fn: LossFn, steps: int,
                        step_sizes: Mapping[str, Tensor | float], names: list[str], first_order: bool, query_pass: QueryPass,
                        wrt: Sequence[Tensor], autocast_dtype: torch.dtype | None, total_tasks: int):
    tasks = len(batch)
    per_task_loss = per_task_losses(loss_fn)
    real = stacked_params(params, tasks)
    frozen = {n: p for n, p in real.items() if n not in step_sizes}

    def inner_step(point: Params, create_graph: bool) -> tuple[Params, Tensor]:
        with mixed_precision(autocast_dtype):
            losses = per_task_loss(run({**frozen, **point} if create_graph else
                                       {**{n: p.detach() for n, p in frozen.items()}, **point}, batch.support_x),
                                   batch.support_y)
        grads = torch.autograd.grad(losses.sum(), [point[n] for n in names], create_graph=create_graph,
                                    allow_unused=True, materialize_grads=True)
        sizes = step_sizes if create_graph else {n: _detached(step_sizes[n]) for n in names}
        return {n: point[n] - sizes[n] * g for n, g in zip(names, grads)}, losses.detach()

    with torch.enable_grad():
        trajectory = [{n: real[n].detach() for n in names}]
        support_losses = None
        for _ in range(steps):
            nxt, losses = inner_step({n: p.requires_grad_() for n, p in
                                      ((n, t.clone()) for n, t in trajectory[-1].items())}, False)
            trajectory.append({n: p.detach() for n, p in nxt.items()})
            support_losses = losses if support_losses is None else support_losses
        outputs, query_losses, query_grads = _query_passes(query_pass, {**frozen, **trajectory[-1]}, batch)
        # the query loss's direct dependence on parameters that do not adapt
        totals = place_gradients({n: query_grads[n].sum(0) / total_tasks for n in frozen}, params, wrt)
        v = [query_grads[n] / total_tasks for n in names]
        for point in reversed(trajectory[:-1]):
            leaves = {n: point[n].clone().requires_grad_() for n in names}
            nxt, _ = inner_step(leaves, True)
            result = torch.autograd.grad([nxt[n] for n in names], [*leaves.values(), *wrt], v, allow_unused=True)
            v = list(result[: len(names)])
            totals = add_gradients(totals, result[len(names):])
        # θ_0 of every task is the shared initialisation
        totals = add_gradients(totals, place_gradients({n: g.sum(0) for n, g in zip(names, v)}, params, wrt))
    return totals, outputs, query_losses, support_losses


def per_task_losses(loss_fn: LossFn) -> Callable[[Tensor, Tensor], Tensor]:
    """`loss_fn` over stacked tasks: outputs `(T, N, ...)`, targets `(T, N, ...)` -> losses `(T,)`,
    on outputs in at least float32 (under CPU autocast the vmapped loss would otherwise stay in
    bf16, unlike the per-task path's).

    Example:
        >>> per_task_losses(torch.nn.functional.mse_loss)(torch.ones(3, 4, 1), torch.zeros(3, 4, 1))
        tensor([1., 1., 1.])
    """
    return vmap(lambda output, target: loss_fn(output.to(torch.promote_types(output.dtype, torch.float32)), target))


def _detached(size: Tensor | float) -> Tensor | float:
    return size.detach() if isinstance(size, Tensor) else size
