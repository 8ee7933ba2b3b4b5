"""How a meta-batch runs, decided in one place from the model's structure and the options.

A learner says *what* is computed; `plan_meta_batch` decides *how*:

- "vmap": every task in one `torch.func.vmap` call, for models made only of layers whose batching
  rules are exact to second order (Linear, activations, Flatten, Dropout);
- "task-groups": the support phases of a few tasks at once as one grouped-convolution graph
  (`functional.task_batched`), for models whose forward is proven to be a conv / BatchNorm / ReLU /
  max-pool / Linear chain (`functional.structure`), whatever their class;
- "per-task": the exact reference path, task after task, for any module;
- "graph": task after task keeping every graph (asked for, or when no meta-gradient is taken).

Every plan computes the same function as the per-task reference loop (tested in float64); where a
faster path cannot run a case exactly, the plan falls back to "per-task" and says why. The
machine-tuned constant, the task group size, lives here. The plan is re-made at every call, so a
model edited after its learner was built gets a plan for what it is now. `logging` shows each new
plan at DEBUG level under the logger "fastadapt.plan".

Example:
    >>> import torch
    >>> from fastadapt.nn import Conv4
    >>> from fastadapt.data.episodes import TaskBatch
    >>> batch = TaskBatch(torch.zeros(4, 5, 1, 28, 28), torch.zeros(4, 5, dtype=torch.long),
    ...                   torch.zeros(4, 5, 1, 28, 28), torch.zeros(4, 5, dtype=torch.long))
    >>> str(plan_meta_batch(Conv4.omniglot(ways=5), batch, request="auto"))
    'task-groups of 2: the forward is a conv/BatchNorm/ReLU/pool/Linear chain; 2 tasks per group on the CPU'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from ..data.episodes import TaskBatch
from .task_batched import task_batched_forward, task_workers_for

__all__ = ["Plan", "Path", "Execution", "plan_meta_batch", "plan_independent_tasks", "vmap_exact", "CPU_TASK_GROUP"]

Path = Literal["vmap", "task-groups", "per-task", "graph"]
Execution = Literal["auto", "loop", "per-task", "graph", "vmap"]
EXECUTIONS: tuple[str, ...] = ("auto", "loop", "per-task", "graph", "vmap")

# Tasks whose support phase runs as one graph on the CPU: 3-7% slower than 4 with 25-30% less peak
# memory (benchmarks/memory_vs_steps.py). On a GPU the whole meta-batch is one group (4.4x faster than
# task by task with 1 inner step and 11x with 5 on an H100, benchmarks/gpu_throughput.py).
CPU_TASK_GROUP = 2

# Layers whose torch.func.vmap batching rules are exact also in second order (checked by tests).
_VMAP_SAFE = (
    nn.Linear, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Identity,
    nn.Flatten, nn.Dropout,
)

_log = logging.getLogger("fastadapt.plan")


@dataclass(frozen=True)
class Plan:
    """How a meta-batch runs: the path, tasks per group and worker threads, and why."""

    path: Path
    group: int = 1
    workers: int = 1
    reasons: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        head = f"task-groups of {self.group}" if self.path == "task-groups" else self.path
        if self.workers > 1:
            head += f", {self.workers} worker threads"
        return f"{head}: {'; '.join(self.reasons)}" if self.reasons else head


def vmap_exact(model: nn.Module) -> bool:
    """Whether every layer of `model` has exact vmap batching rules to second order.

    Example:
        >>> vmap_exact(nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)))
        True
        >>> vmap_exact(nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4)))
        False
    """
    leaves = [m for m in model.modules() if not list(m.children())]
    return all(isinstance(m, _VMAP_SAFE) for m in leaves)


def plan_meta_batch(model: nn.Module, batch: TaskBatch, *, request: Execution, differentiate: bool = True,
                    per_task_statistics: bool = False, task_group: int | None = None, task_workers: int = 1,
                    user_functions: str | None = None) -> Plan:
    """The plan for one meta-batch of `model`.

    Args:
        request: the learner's `execution`: "auto" (the fastest exact path), "loop" (task groups
            where the structure allows, else per task), "per-task", "graph" or "vmap" (run only where
            exact, else per task, with the reason).
        differentiate: a meta-gradient is taken (grad mode on, trainable parameters); without one
            the loop keeps each task's graph, which costs nothing then.
        per_task_statistics: the learner intercepts each task's own BatchNorm calls (MAML++'s
            per-step running statistics), which needs one task at a time.
        task_group: tasks per group; None: `CPU_TASK_GROUP` on the CPU, the whole batch on a GPU.
        task_workers: task groups at once in threads on the CPU, where the forward is thread-safe.
        user_functions: what of the user's runs inside the inner loop (a loss, hooks, extra
            terms), not known to be vmap-safe: "auto" does not vmap it.
    """
    reasons: list[str] = []
    if request == "vmap" or (request == "auto" and not user_functions):
        if vmap_exact(model):
            return _logged(Plan("vmap", reasons=("every layer has exact vmap rules",)))
        if request == "vmap":
            reasons.append("vmap asked for, but not every layer has exact vmap rules to second order "
                           "(BatchNorm's are wrong): exact per-task path instead")
    if request == "graph" or not differentiate:
        why = "asked for" if request == "graph" else "no meta-gradient is taken"
        return _logged(Plan("graph", reasons=(*reasons, why)))
    if request == "auto" and user_functions and vmap_exact(model):
        reasons.append(f"{user_functions} of yours not known to be vmap-safe (execution='vmap' to vmap them)")
    if request in ("auto", "loop"):
        if per_task_statistics:
            reasons.append("per-step BatchNorm statistics see one task at a time")
        elif task_batched_forward(model) is None:
            reasons.append("the forward is not a conv/BatchNorm/ReLU/pool/Linear chain")
        else:
            on_cpu = batch.support_x.device.type == "cpu"
            group = task_group or (CPU_TASK_GROUP if on_cpu else len(batch))
            where = "set by task_group" if task_group else "on the CPU" if on_cpu else "the whole batch on a GPU"
            return _logged(Plan("task-groups", group, task_workers_for(task_workers, model, batch),
                                ("the forward is a conv/BatchNorm/ReLU/pool/Linear chain",
                                 f"{group} tasks per group {where}")))
    elif request == "per-task":
        reasons.append("asked for")
    return _logged(Plan("per-task", reasons=tuple(reasons)))


def plan_independent_tasks(model: nn.Module, batch: TaskBatch, *, task_group: int | None,
                           task_workers: int = 1) -> Plan:
    """The plan for tasks whose inner loops keep no graph from step to step (Reptile's fine-tuning,
    iMAML's proximal solves): `task_group` tasks at once as one grouped graph where the forward is
    a conv/BatchNorm/ReLU/pool/Linear chain, else task by task; `task_workers` groups (or tasks) at
    once in threads on the CPU where the forward is thread-safe.

    Example:
        >>> import torch
        >>> from fastadapt.nn import Conv4
        >>> batch = TaskBatch(torch.zeros(4, 5, 1, 28, 28), torch.zeros(4, 5, dtype=torch.long),
        ...                   torch.zeros(4, 5, 1, 28, 28), torch.zeros(4, 5, dtype=torch.long))
        >>> plan_independent_tasks(Conv4.omniglot(ways=5), batch, task_group=4).path
        'task-groups'
        >>> plan_independent_tasks(nn.Sequential(nn.Flatten(), nn.Linear(784, 5)), batch, task_group=None).path
        'per-task'
    """
    workers = task_workers_for(task_workers, model, batch)
    if task_group is None:
        return _logged(Plan("per-task", workers=workers, reasons=("task by task (no task_group set)",)))
    if task_batched_forward(model) is None:
        return _logged(Plan("per-task", workers=workers,
                            reasons=("the forward is not a conv/BatchNorm/ReLU/pool/Linear chain",)))
    return _logged(Plan("task-groups", min(task_group, len(batch)), workers,
                        ("the forward is a conv/BatchNorm/ReLU/pool/Linear chain", f"{task_group} tasks per group")))


_last_logged: list[Plan] = []


def _logged(plan: Plan) -> Plan:
    if _log.isEnabledFor(logging.DEBUG) and _last_logged[-1:] != [plan]:
        _log.debug("meta-batch plan: %s", plan)
        _last_logged[:] = [plan]
    return plan

