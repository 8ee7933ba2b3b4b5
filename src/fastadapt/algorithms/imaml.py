"""Implicit MAML (Rajeswaran, Finn, Kakade and Levine 2019, "Meta-Learning with Implicit Gradients").

Each task solves a proximally regularised inner problem from phi = theta,

    phi*(theta) = argmin_phi  L_support(phi) + lam/2 ||phi - theta||^2,

with `inner_steps` steps of SGD or Adam that keep no graph from one step to the next. At a
stationary point the implicit function theorem gives d phi*/d theta = (I + H/lam)^-1, with H the
Hessian of the support loss at phi*, so the task's meta-gradient is the solution g of

    (I + (H + damping I)/lam) g = grad L_query(phi)

found by `cg_steps` iterations of conjugate gradient on Hessian-vector products (a double
backward through the support loss at phi): the engine's implicit rule, `functional.implicit`; the
inner problem runs through the engine's one inner loop, `functional.adapt`. Memory holds the
support graphs of one task group (`task_group` tasks solved at once) and one query graph, whatever
the number of inner steps;
compute is k inner steps plus `cg_steps` Hessian-vector products. `damping` (0 in the paper's
equation) adds `damping * I` to H, which keeps the system positive definite where the support loss's curvature is not below -(lam + damping); conjugate
gradient also stops along a direction of non-positive curvature (truncated CG) instead of stepping
to infinity. The authors' code solves (2 I + H / (lam + 10)) g = grad, for lam = 2 the system
here with damping 22 up to a constant factor (see docs/methods/imaml.md and recipes/imaml/).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from ..data.episodes import TaskBatch
from ..functional import Params, adam, adapt, add_gradients, forward, loss_with_grads, sgd
from ..functional.implicit import implicit_meta_gradient
from ..functional.planner import Plan, plan_independent_tasks
from ..functional.task_batched import check_task_workers, per_task_losses, stacked_params, task_batched_forward
from ..runtime import map_in_threads
from .base import AdaptedModel, Learner
from .objectives import TaskKind, check_kind, task_loss, task_metrics

__all__ = ["IMAML", "proximal_adapt"]

IMAMLInnerOptimizer = Literal["sgd", "adam"]
# where the proximal term acts: in every inner step's gradient (the paper's objective), or once,
# as one SGD step on it after plain optimizer steps on the support loss (the authors' code)
ProximalMode = Literal["every_step", "pull_back"]
Vectors = list[Tensor]


def proximal_adapt(
    model: nn.Module,
    theta: Params,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    lr: float,
    lam: float,
    optimizer: IMAMLInnerOptimizer = "sgd",
    frozen: Params | None = None,
    proximal: ProximalMode = "every_step",
    keep_graph: bool = False,
) -> tuple[Params, Tensor]:
    """Approximately minimises `loss_fn(model(x; phi), y) + lam/2 ||phi - theta||^2` from phi = theta.

    `steps` steps of SGD or Adam (`functional.optim`, as `torch.optim`'s) from `theta` through the
    engine's one inner loop, with no graph between steps (memory does not grow with `steps`; works
    under `torch.no_grad()`).
    `proximal="pull_back"` (the authors' code): the steps see the support loss alone, then one SGD
    step on the proximal term, phi <- phi - lr * lam * (phi - theta), pulls phi back toward theta.
    `frozen` parameters take part in the forward pass but do not adapt. Returns the adapted
    (detached) parameters and the support loss at theta; with `keep_graph`, the adapted parameters
    keep their graph to `x` (an attack that poisons the support set differentiates through them).

    Example:
        >>> m = torch.nn.Linear(1, 1)
        >>> theta = {k: v.detach() for k, v in m.named_parameters()}
        >>> phi, _ = proximal_adapt(m, theta, torch.ones(4, 1), torch.zeros(4, 1),
        ...                         loss_fn=torch.nn.functional.mse_loss, steps=3, lr=0.1, lam=1.0)
        >>> sorted(phi)
        ['bias', 'weight']
    """
    fixed = {name: t.detach() for name, t in (frozen or {}).items()}
    return _proximal_descent(lambda phi: loss_fn(forward(model, {**fixed, **phi}, x), y), theta,
                             steps=steps, lr=lr, lam=lam, optimizer=optimizer, proximal=proximal, keep_graph=keep_graph)


def _proximal_descent(losses_at: Callable[[Params], Tensor], theta: Params, *, steps: int, lr: float, lam: float,
                      optimizer: IMAMLInnerOptimizer, proximal: ProximalMode, keep_graph: bool = False
                      ) -> tuple[Params, Tensor]:
    """The inner loop of `proximal_adapt` for any loss, through the engine's one loop
    (`functional.adapt`, no graph between steps): `losses_at(phi)` is one loss, or one per task `(T,)`
    for tasks stacked on the parameters' leading dimension (their sum is minimised: the tasks are
    independent, and SGD and Adam act element-wise, so each task steps as it would alone). With
    `keep_graph`, the steps keep their graph (to the inputs of `losses_at`)."""
    anchor = {name: t.detach() for name, t in theta.items()}

    def proximal_term(phi: Params, per_task: bool) -> Tensor:
        """lam/2 ||phi - theta||^2 (per task for stacked tasks); its gradient is exactly lam (phi - theta)."""
        squares = [(phi[n] - anchor[n]) ** 2 for n in phi]
        return lam / 2 * sum(s.flatten(1).sum(1) if per_task else s.sum() for s in squares)

    def inner_loss(phi: Params, step: int) -> Tensor:
        support = losses_at(phi)
        return support + proximal_term(phi, support.dim() == 1) if proximal == "every_step" else support

    trajectory = adapt(inner_loss, anchor, optimizer=adam(lr) if optimizer == "adam" else sgd(lr), steps=steps,
                       keep_graph=keep_graph)
    phi = trajectory.points[-1]
    if proximal == "pull_back":
        phi = adapt(lambda p, step: proximal_term(p, False), phi, optimizer=sgd(lr), steps=1,
                    keep_graph=keep_graph).points[-1]
    return phi, trajectory.losses[0]


class IMAML(Learner):
    """Implicit MAML over any `nn.Module`: proximal inner problem, implicit meta-gradient by CG.

    Args:
        model: any module; its trainable parameters are the meta-parameters theta.
        inner_lr: step size of the inner optimizer.
        inner_steps: inner optimizer steps, in training and (by default) evaluation.
        lam: strength of the proximal term lam/2 ||phi - theta||^2 (> 0).
        cg_steps: conjugate-gradient iterations for the meta-gradient (>= 1).
        cg_damping: added to the Hessian of the support loss in the linear system (>= 0).
        inner_optimizer: "sgd" (the paper's iMAML-GD) or "adam".
        proximal: "every_step" (the paper's objective: the proximal term in every inner step's
            gradient) or "pull_back" (the authors' code: plain steps on the support loss, then one
            SGD step on the proximal term toward theta); the meta-gradient is the same CG solve.
        task: "classification" (cross-entropy, accuracy) or "regression" (MSE).
        eval_lam: the proximal strength of test-time adaptation (`adapt`, `query_outputs`,
            `task_metrics`: evaluation and validation); None (the default): `lam`, the problem
            training solved; 0: plain fine-tuning from theta, as the authors' `measure_accuracy.py`.
        task_group: experimental, opt-in: tasks whose inner problems and conjugate-gradient
            solves run as one batched graph (where the forward is a conv/BatchNorm/ReLU/pool/Linear
            chain, `functional.planner`; others go task by task: `plan(batch)` says); their support graphs are alive together. 8 measured 1.37x task by
            task on the CPU (benchmarks/imaml_paths_cpu.py), but short float32 training runs with
            it ended lower on three seeds for a cause not yet found (docs/methods/imaml.md).
            None (the default): task by task.
        task_workers: on the CPU, train this many tasks (or task groups) at once in Python
            threads with one intra-op thread each (`runtime.map_in_threads`; a fastadapt Conv4
            with max-pool blocks): the meta-gradient of a one-thread run bit for bit, faster on
            2+ cores, that many tasks' graphs in memory. `training.evaluate_learner` then runs that
            many batches of episodes at once.

    `adapt` and evaluation solve the same regularised inner problem as training unless `eval_lam`
    says otherwise.

    Example:
        >>> from fastadapt.nn import MLP
        >>> from fastadapt.data import SinusoidTasks
        >>> imaml = IMAML(MLP(1, [40, 40], 1), inner_lr=0.01, inner_steps=5, task="regression")
        >>> loss, metrics = imaml.meta_loss(SinusoidTasks().task_batch(0, 2))
        >>> loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.1,
        inner_steps: int = 16,
        *,
        lam: float = 2.0,
        cg_steps: int = 5,
        cg_damping: float = 0.0,
        inner_optimizer: IMAMLInnerOptimizer = "sgd",
        proximal: ProximalMode = "every_step",
        task: TaskKind = "classification",
        task_group: int | None = None,
        eval_lam: float | None = None,
        task_workers: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
            raise ValueError(f"cg_steps must be an integer >= 1 (conjugate-gradient iterations), got {cg_steps!r}")
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr!r}")
        if not lam > 0:
            raise ValueError(f"lam (the proximal regularisation strength) must be > 0, got {lam!r}")
        if eval_lam is not None and not eval_lam >= 0:
            raise ValueError(f"eval_lam (the proximal strength at test time) must be >= 0 or None (lam), got {eval_lam!r}")
        if not cg_damping >= 0:
            raise ValueError(f"cg_damping must be >= 0, got {cg_damping!r}")
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"inner_optimizer must be 'sgd' or 'adam', got {inner_optimizer!r}")
        if proximal not in get_args(ProximalMode):
            raise ValueError(f"proximal must be 'every_step' or 'pull_back', got {proximal!r}")
        if task_group is not None and (isinstance(task_group, bool) or not isinstance(task_group, int)
                                       or task_group < 1):
            raise ValueError(f"task_group must be an integer >= 1 or None (task by task), got {task_group!r}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.lam = float(lam)
        self.eval_lam = self.lam if eval_lam is None else float(eval_lam)
        self.cg_steps = cg_steps
        self.cg_damping = float(cg_damping)
        self.inner_optimizer: IMAMLInnerOptimizer = inner_optimizer
        self.proximal: ProximalMode = proximal
        self.task = check_kind(task)
        self.task_group = task_group
        self.task_workers = check_task_workers(task_workers)

    # -- the pieces ---------------------------------------------------------------------------
    def _loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        return task_loss(self.task, output, target)

    def _split(self) -> tuple[Params, Params]:
        """(trainable meta-parameters, frozen parameters), both detached."""
        params = dict(self.model.named_parameters())
        return ({k: p.detach() for k, p in params.items() if p.requires_grad},
                {k: p.detach() for k, p in params.items() if not p.requires_grad})

    def _solve(self, theta: Params, frozen: Params, x: Tensor, y: Tensor, steps: int, lam: float
               ) -> tuple[Params, Tensor]:
        return proximal_adapt(self.model, theta, x, y, loss_fn=self._loss_fn, steps=steps, lr=self.inner_lr,
                              lam=lam, optimizer=self.inner_optimizer, frozen=frozen, proximal=self.proximal,
                              keep_graph=x.requires_grad)

    def implicit_gradient(self, phi: Params, frozen: Params, support: tuple[Tensor, Tensor],
                          query: tuple[Tensor, Tensor]) -> tuple[Vectors, Tensor, Tensor]:
        """The task's meta-gradient at the adapted `phi` (one tensor per entry of `phi`), the query
        output and the query loss: CG on `(I + (H + damping I)/lam) g = grad L_query(phi)`."""
        v, out, query_loss = self._query_gradient(phi, frozen, query)
        support_x, support_y = support
        g = self._implicit_solve(lambda p: self._loss_fn(forward(self.model, {**frozen, **p}, support_x), support_y),
                                 phi, v, batched=False)
        return g, out, query_loss

    def _query_gradient(self, phi: Params, frozen: Params, query: tuple[Tensor, Tensor]) -> tuple[Vectors, Tensor, Tensor]:
        """grad L_query(phi) (one tensor per entry of `phi`), the query output and loss (detached)."""
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in phi.values()]
            out = forward(self.model, {**frozen, **dict(zip(phi, leaves))}, query[0])
            query_loss = self._loss_fn(out, query[1])
            v = list(torch.autograd.grad(query_loss, leaves, materialize_grads=True))
        return v, out.detach(), query_loss.detach()

    def _implicit_solve(self, support_losses_at: Callable[[Params], Tensor], phi: Params, v: Vectors,
                        batched: bool) -> Vectors:
        """The implicit rule (`functional.implicit_meta_gradient`) with this learner's lam, damping and CG steps."""
        return implicit_meta_gradient(support_losses_at, phi, v, lam=self.lam, damping=self.cg_damping,
                                      cg_steps=self.cg_steps, batched=batched)

    def plan(self, batch: TaskBatch) -> Plan:
        """How `meta_loss(batch)` and evaluation solve the tasks now, and why (`functional.planner`).

        Example:
            >>> from fastadapt.nn import MLP
            >>> from fastadapt.data import SinusoidTasks
            >>> IMAML(MLP(1, [8], 1), task="regression").plan(SinusoidTasks().task_batch(0, 2)).path
            'per-task'
        """
        return plan_independent_tasks(self.model, batch, task_group=self.task_group, task_workers=self.task_workers)

    @staticmethod
    def _parts(plan: Plan, batch: TaskBatch) -> list[TaskBatch]:
        """The batch in the plan's task groups, else whole (task by task), or one task per part for
        several workers."""
        if plan.path == "task-groups":
            return batch.split(plan.group)
        return batch.split(1) if plan.workers > 1 else [batch]

    def _stacked_losses(self, frozen: Params, x: Tensor, y: Tensor) -> Callable[[Params], Tensor]:
        """Per-task losses `(T,)` of stacked parameters on stacked inputs, frozen entries shared."""
        run, per_task = task_batched_forward(self.model), per_task_losses(self._loss_fn)
        assert run is not None, "planned task groups for a forward that is not a chain"
        fixed = stacked_params(frozen, x.shape[0])
        return lambda phi: per_task(run({**fixed, **phi}, x), y)

    def _solve_tasks(self, theta: Params, frozen: Params, part: TaskBatch, steps: int, lam: float
                     ) -> tuple[Params, Tensor]:
        """The inner problems of the tasks of `part` at once: phi stacked `(T, ...)`, support losses `(T,)`."""
        return _proximal_descent(self._stacked_losses(frozen, part.support_x, part.support_y),
                                 stacked_params(theta, len(part)),
                                 steps=steps, lr=self.inner_lr, lam=lam, optimizer=self.inner_optimizer,
                                 proximal=self.proximal)

    # -- the API ------------------------------------------------------------------------------
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> AdaptedModel:
        """Solves one task's test-time inner problem (`eval_lam`) and returns the adapted predictor
        (model untouched). Differentiable w.r.t. `support_x` when it requires grad (through the
        unrolled inner steps).

        Example:
            >>> from fastadapt.nn import Conv4
            >>> learner = IMAML(Conv4.omniglot(ways=5), inner_steps=2).adapt(torch.rand(5, 1, 28, 28), torch.arange(5))
            >>> learner(torch.rand(3, 1, 28, 28)).shape
            torch.Size([3, 5])
        """
        theta, frozen = self._split()
        phi, _ = self._solve(theta, frozen, support_x, support_y, steps or self.inner_steps, self.eval_lam)
        return AdaptedModel(self.model, {**frozen, **phi})

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean query loss after adaptation and detached metrics (means over tasks).

        `loss.backward()` deposits the implicit meta-gradient averaged over tasks. Metrics: `loss`,
        `accuracy` (classification), `support_loss` (before adaptation).
        """
        theta, frozen = self._split()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        differentiate = torch.is_grad_enabled() and bool(trainable)
        plan = self.plan(batch)
        solve = self._tasks_at_once if plan.path == "task-groups" else self._task_by_task
        total, losses, rows = None, [], []
        # parts summed in their order, then divided once: the same sums with and without workers
        for part_total, part_losses, part_rows in map_in_threads(
                lambda part: solve(part, theta, frozen, differentiate), self._parts(plan, batch), plan.workers):
            if differentiate:
                total = add_gradients(total, part_total)
            losses += part_losses
            rows += part_rows
        mean_loss = torch.stack(losses).mean()
        metrics = {k: torch.stack([r[k] for r in rows]).mean() for k in rows[0]}
        if not differentiate:
            return mean_loss, metrics
        return loss_with_grads(mean_loss, trainable, [g / len(batch) for g in total]), metrics

    def _tasks_at_once(self, part: TaskBatch, theta: Params, frozen: Params, differentiate: bool
                       ) -> tuple[Vectors, list[Tensor], list[dict[str, Tensor]]]:
        """The summed implicit meta-gradient of `part`'s tasks, their query losses and metrics: the
        inner problems and CG solves in one batched graph, the query gradients task by task."""
        phi, support_losses = self._solve_tasks(theta, frozen, part, self.inner_steps, self.lam)
        queries: list[Vectors] = []
        losses, rows = [], []
        for t in range(len(part)):
            ep, phi_t = part[t], {n: p[t] for n, p in phi.items()}
            if differentiate:
                v, out, loss = self._query_gradient(phi_t, frozen, (ep.query_x, ep.query_y))
                queries.append(v)
            else:
                out, loss = self._query_output(phi_t, frozen, ep.query_x, ep.query_y)
            losses.append(loss)
            rows.append({**task_metrics(self.task, out, ep.query_y), "support_loss": support_losses[t]})
        if not differentiate:
            return [], losses, rows
        v_stacked = [torch.stack(parts) for parts in zip(*queries)]
        g = self._implicit_solve(self._stacked_losses(frozen, part.support_x, part.support_y), phi, v_stacked,
                                 batched=True)
        return [gi.sum(0) for gi in g], losses, rows

    def _task_by_task(self, part: TaskBatch, theta: Params, frozen: Params, differentiate: bool
                      ) -> tuple[Vectors, list[Tensor], list[dict[str, Tensor]]]:
        """As `_tasks_at_once`, one task after another (models `functional.task_batched` does not know)."""
        total: Vectors | None = None
        losses, rows = [], []
        for t in range(len(part)):
            ep = part[t]
            phi, support_loss = self._solve(theta, frozen, ep.support_x, ep.support_y, self.inner_steps, self.lam)
            if differentiate:
                g, out, loss = self.implicit_gradient(phi, frozen, (ep.support_x, ep.support_y),
                                                      (ep.query_x, ep.query_y))
                total = add_gradients(total, g)
            else:
                out, loss = self._query_output(phi, frozen, ep.query_x, ep.query_y)
            losses.append(loss)
            rows.append({**task_metrics(self.task, out, ep.query_y), "support_loss": support_loss})
        return total or [], losses, rows

    def _query_output(self, phi: Params, frozen: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = forward(self.model, {**frozen, **phi}, x).detach()
        return out, self._loss_fn(out, y)

    def _task_metrics(self, batch: TaskBatch, inner_steps: int | None) -> dict[str, Tensor]:
        """Also `loss_before`, the query loss before adapting."""
        theta, frozen = self._split()
        params = {**frozen, **theta}
        outputs = self._query_outputs(batch, inner_steps)
        rows = []
        for t in range(len(batch)):
            ep = batch[t]
            row = task_metrics(self.task, outputs[t], ep.query_y)
            row["loss_before"] = self._loss_fn(forward(self.model, params, ep.query_x), ep.query_y)
            rows.append(row)
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def _query_outputs(self, batch: TaskBatch, inner_steps: int | None) -> Tensor:
        """After solving each task's test-time inner problem (`eval_lam`)."""
        steps = inner_steps or self.inner_steps
        theta, frozen = self._split()
        outputs = []
        plan = self.plan(batch)
        for part in self._parts(plan, batch):
            adapted = (self._solve_tasks(theta, frozen, part, steps, self.eval_lam)[0] if plan.path == "task-groups"
                       else None)
            for t in range(len(part)):
                ep = part[t]
                phi = ({n: p[t] for n, p in adapted.items()} if adapted is not None
                       else self._solve(theta, frozen, ep.support_x, ep.support_y, steps, self.eval_lam)[0])
                outputs.append(forward(self.model, {**frozen, **phi}, ep.query_x))
        return torch.stack(outputs)
