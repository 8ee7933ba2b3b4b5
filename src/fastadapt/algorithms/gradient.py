"""One gradient-based meta-learner; MAML, FOMAML, Meta-SGD and ANIL are options of it.

- MAML: all parameters adapt, second-order through every inner step.
- FOMAML: inner gradients treated as constants (`first_order=True`).
- Meta-SGD: one learned step size per parameter entry (`learn_inner_lr=True`).
- ANIL: only the head adapts (`adapt="head"`), the body is shared by all tasks.
- MAML++ (Antoniou et al. 2019): per-step learned rates, multi-step loss, per-step BatchNorm
  weights and statistics, derivative-order annealing (`MAMLPlusPlus`, `algorithms.mamlpp`).

The inner optimizer (`inner_optimizer=`) is SGD by default, or momentum, Adam or any gradient
transformation (`functional.optim`), differentiable to second order.

Execution over a `TaskBatch` is chosen at every call by `functional.planner` from the model's
structure and the options (`learner.plan(batch)` says which path and why; `execution=` asks):
- "auto" (default): "vmap" for models made only of layers whose vmap rules are exact (Linear,
  activations, Flatten, Dropout), e.g. the sinusoid MLP; else "loop".
- "loop": tasks back-propagated one at a time as soon as their loss exists, so only one task's (or
  task group's) graph is alive (see `functional.taskwise`), in two passes: a first-order query
  pass (optionally compiled or bf16), then the backward through the support-set inner loop (see
  `functional.query_pass`). For a model whose forward is a conv/BatchNorm/ReLU/pool/Linear chain (any
  class: `functional.structure`) the support phases of a few tasks run as one grouped-convolution
  graph (`functional.task_batched`); per-step BatchNorm statistics, or any other model, run task by
  task (also exact). Measured on 2 CPU cores as fast as holding all graphs at 5x less memory.
- "per-task": the loop, task by task, whatever the model.
- "graph": the loop keeping every task's graph; the loss supports any further autograd use.
- "vmap": all tasks in one `torch.func.vmap` call, where that is exact; a model with BatchNorm
  runs task by task instead (vmap's second-order rules through training-mode BatchNorm are wrong).

Every path supports every inner optimizer, per-step rates and BatchNorm, and the multi-step loss
exactly, with or without `checkpoint_inner_loop` (which stores each step's parameters and optimizer
state and replays single steps in the backward pass).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.func import vmap

from ..data.episodes import TaskBatch
from ..functional import (Params, QueryPass, adapt, forward, loss_with_grads, mixed_precision,
                          model_support_loss)
from ..functional.inner_loop import LossFn, StepHooks
from ..functional.seams import InputHook, Seams
from ..functional.optim import INNER_OPTIMIZERS, GradientTransformation, LearningRate
from ..functional.step_norm import PerStepBatchNorm, batch_norm_layers
from ..functional.planner import EXECUTIONS, Execution, Plan, plan_meta_batch
from ..functional.structure import fixed_structure
from ..functional.rules import meta_gradients
from ..functional.task_batched import check_task_workers, looped_forward, task_batched_forward
from .annealing import multi_step_loss_weights
from .base import AdaptedModel, Learner
from .clone import Clone
from .objectives import TaskKind, check_kind, task_loss, task_metrics

__all__ = ["GradientLearner", "MAML", "FOMAML", "MetaSGD", "ANIL"]

Precision = Literal["fp32", "bf16"]
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


class GradientLearner(Learner):
    """Gradient-based meta-learning (MAML family) over any `nn.Module`.

    Args:
        model: any module; its parameters are the meta-parameters (the initialisation).
        inner_lr: inner SGD step size (initial value when `learn_inner_lr`).
        inner_steps: SGD steps on the support set, in training and (by default) evaluation.
        first_order: drop second-order terms (FOMAML).
        learn_inner_lr: learn one step size per parameter entry (Meta-SGD).
        adapt: which parameters adapt in the inner loop: None for all, or name prefixes
            (e.g. "head" for ANIL).
        task: "classification" (cross-entropy, accuracy) or "regression" (MSE).
        execution: how the meta-batch runs: "auto", "loop", "per-task", "graph" or "vmap"; see the
            module docstring. Never changes the result beyond rounding.
        compile: compile the query pass of "loop" execution with `torch.compile` (one compilation
            per input shape, tens of seconds; needs a C++ compiler). Not with per-step BatchNorm
            statistics (they intercept the pass's batch_norm calls: it runs eagerly), and one task
            group at a time (a compiled pass serves one thread).
        precision: "bf16" runs forward and backward under bf16 autocast (CPU, CUDA); weights and
            meta-gradients stay float32.
        checkpoint_inner_loop: keep no graph across inner steps in "loop" execution; rebuild each
            step's graph during the backward, so memory does not grow with `inner_steps`.
        task_group: tasks whose support phase runs as one batched graph (conv-chain models in
            "loop" execution, `functional.task_batched`). Memory grows with it. None (the default):
            `functional.planner.CPU_TASK_GROUP` on the CPU, the whole meta-batch on a GPU.
        task_workers: on the CPU, run this many task groups at once in Python threads with one
            intra-op thread each (`runtime.map_in_threads`); the same result. On 2 cores 2 workers
            were 1.2-1.6x faster than one group at a time with 2 intra-op threads (second-order
            MAML, Conv4 Omniglot 5w1s, docs/performance.md), with that many groups' graphs in memory.
            Applies where the forward is thread-safe (a conv chain with a max-pool first block:
            `fastadapt.nn.Conv4`, or the same layers in an `nn.Sequential`) and the plan runs task
            groups; otherwise batches run one group at a time (`plan(batch)` says so).
        inner_optimizer: "sgd" (default), "momentum" (0.9) or "adam" (betas 0.9, 0.999), at rate
            `inner_lr` (or the learned rates); or a function `rate -> GradientTransformation`
            (`functional.optim`), e.g. `lambda lr: chain(clip_by_global_norm(1.0), scale_by_lr(lr))`.
            Its state starts afresh for every task.
        per_step_inner_lr: learn one inner rate per adapted parameter tensor and inner step,
            initialised at `inner_lr` (MAML++ LSLR). Not with `learn_inner_lr`.
        multi_step_loss_iterations: for the first this many outer iterations, the query loss is
            MAML++'s multi-step loss, a weighted sum of the query losses after every inner step,
            the weights annealed towards the last step (`algorithms.annealing`); 0: off.
        per_step_bn_weights: BatchNorm weights and biases per inner step, meta-learned and not
            adapted in the inner loop (MAML++ BNWB; `functional.step_norm`).
        per_step_bn_statistics: per-step BatchNorm running statistics (MAML++ BNRS), updated in
            training, where batch statistics still normalise; evaluation (`task_metrics`,
            `adapt`) normalises with them instead, inductively. See `functional.step_norm`.
        first_order_iterations: derivative-order annealing: first-order meta-gradients for the
            first this many outer iterations, then second order.
        loss_fn: `loss_fn(outputs, targets) -> scalar` for one task, the inner and the outer loss
            (and the `loss` metric); None: cross-entropy for classification, MSE for regression.
            It runs task by task: "auto" execution does not vmap it (ask `execution="vmap"` for a
            vmap-safe one).
        inner_loss_fn: the support-set loss of the inner loop alone (default `loss_fn`), e.g.
            `objectives.trimmed_loss(task, 0.4)`, which ignores the support examples with the
            largest loss (noisy labels). Runs task by task, as `loss_fn`; the `support_loss`
            metric is then this loss.
        support_hook, query_hook, inner_term, outer_term, hook_gradients, query_term: per-task
            additions on every execution path (`functional.seams`): inputs transformed given the
            current parameters (an attack, augmentation, noise), terms added to the inner and the
            outer loss (a regulariser, a KL divergence, TRADES' term on the query set). Hooks and
            terms run in evaluation too (`robust.RobustTraining`'s act in train mode only).

    The outer iteration that the last two count is `iteration`, advanced by each `meta_loss`
    call with gradients enabled and saved in the state dict (so a resumed run continues it).

    Example:
        >>> import torch
        >>> from fastadapt.nn import MLP
        >>> from fastadapt.data import SinusoidTasks
        >>> maml = MAML(MLP(1, [40, 40], 1), inner_lr=0.01, task="regression")
        >>> loss, metrics = maml.meta_loss(SinusoidTasks().task_batch(0, 4))
        >>> loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        *,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        adapt: str | Sequence[str] | None = None,
        task: TaskKind = "classification",
        execution: Execution = "auto",
        compile: bool = False,
        precision: Precision = "fp32",
        checkpoint_inner_loop: bool = False,
        task_group: int | None = None,
        task_workers: int = 1,
        inner_optimizer: str | Callable[[LearningRate], GradientTransformation] = "sgd",
        per_step_inner_lr: bool = False,
        multi_step_loss_iterations: int = 0,
        per_step_bn_weights: bool = False,
        per_step_bn_statistics: bool = False,
        first_order_iterations: int = 0,
        loss_fn: LossFn | None = None,
        inner_loss_fn: LossFn | None = None,
        support_hook: InputHook | None = None,
        query_hook: InputHook | None = None,
        inner_term: Callable[[Params, int], Tensor] | None = None,
        outer_term: Callable[[Params, Params], Tensor] | None = None,
        hook_gradients: bool = False,
        query_term: Callable[[Params, Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr!r}")
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(map(repr, EXECUTIONS))}, got {execution!r}")
        if precision not in _AUTOCAST:
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if not (callable(inner_optimizer) or inner_optimizer in INNER_OPTIMIZERS):
            raise ValueError(f"inner_optimizer must be one of {', '.join(INNER_OPTIMIZERS)} (or a function "
                             f"rate -> GradientTransformation), got {inner_optimizer!r}")
        for name, value in (("multi_step_loss_iterations", multi_step_loss_iterations),
                            ("first_order_iterations", first_order_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if per_step_inner_lr and learn_inner_lr:
            raise ValueError("per_step_inner_lr (one rate per tensor and step) and learn_inner_lr (one rate per "
                             "entry, Meta-SGD) are two ways of learning the inner rates; choose one")
        if first_order and first_order_iterations:
            raise ValueError(f"first_order_iterations={first_order_iterations} anneals from first to second order, "
                             "but the learner is first order throughout (first_order=True)")
        per_step_norm = per_step_bn_weights or per_step_bn_statistics
        for name, value in (("loss_fn", loss_fn), ("inner_loss_fn", inner_loss_fn)):
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be a function (outputs, targets) -> scalar loss, got {value!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.inner_loss_fn = inner_loss_fn
        self.seams = Seams(support_hook, query_hook, inner_term, outer_term, hook_gradients, query_term)
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.task = check_kind(task)
        self.inner_optimizer = inner_optimizer
        self._make_optimizer = INNER_OPTIMIZERS[inner_optimizer] if isinstance(inner_optimizer, str) else inner_optimizer
        self.step_norm = (PerStepBatchNorm(model, inner_steps, weights=per_step_bn_weights,
                                           statistics=per_step_bn_statistics) if per_step_norm else None)
        # With per-step BatchNorm weights the layers' own weights and biases are replaced, not adapted.
        replaced = ({f"{name}.{kind}" for name, _ in batch_norm_layers(model) for kind in ("weight", "bias")}
                    if per_step_bn_weights else set())
        self.adapt_names = [n for n in _select(model, adapt) if n not in replaced]
        if not self.adapt_names:
            raise ValueError(f"adapt={adapt!r} leaves nothing to adapt once per-step BatchNorm weights replace "
                             "the BatchNorm parameters")
        self.per_step_lrs = (
            nn.ParameterList(nn.Parameter(torch.full((inner_steps,), float(inner_lr))) for _ in self.adapt_names)
            if per_step_inner_lr else None
        )
        self.multi_step_loss_iterations = multi_step_loss_iterations
        self.first_order_iterations = first_order_iterations
        if multi_step_loss_iterations or first_order_iterations:
            self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.inner_lrs = (
            nn.ParameterList(
                nn.Parameter(torch.full_like(p, inner_lr, requires_grad=True))
                for name, p in model.named_parameters()
                if name in self.adapt_names
            )
            if learn_inner_lr
            else None
        )
        self.execution: Execution = execution
        self.precision: Precision = precision
        self.checkpoint_inner_loop = checkpoint_inner_loop
        if task_group is not None and (isinstance(task_group, bool) or not isinstance(task_group, int)
                                       or task_group < 1):
            raise ValueError(f"task_group must be an integer >= 1 or None, got {task_group!r}")
        self.task_group = task_group
        self.task_workers = check_task_workers(task_workers)
        # per-step BatchNorm statistics intercept the query pass's batch_norm calls, which a compiled pass cannot
        self._query_pass = QueryPass(model, self._loss_fn, compile=compile and not per_step_bn_statistics,
                                     autocast_dtype=_AUTOCAST[precision])
        self.compile = compile

    # -- the pieces ---------------------------------------------------------------------------
    def meta_params(self) -> Params:
        """The model's parameters by name (views of the live ones: the initialisation)."""
        return dict(self.model.named_parameters())

    def step_sizes(self, step: int = 0) -> dict[str, Tensor | float]:
        """Inner step size per adapted parameter at inner step `step` (0-based): learned tensors
        (Meta-SGD, or per step with `per_step_inner_lr`) or the constant."""
        if self.per_step_lrs is not None:
            return {name: rates[step] for name, rates in zip(self.adapt_names, self.per_step_lrs)}
        if self.inner_lrs is None:
            return {name: self.inner_lr for name in self.adapt_names}
        return dict(zip(self.adapt_names, self.inner_lrs))

    def inner_optimizer_for_task(self) -> GradientTransformation:
        """The inner optimizer at the current (possibly learned, per-step) rates."""
        rates: LearningRate = (
            [self.step_sizes(k) for k in range(self.inner_steps)] if self.per_step_lrs is not None
            else self.step_sizes())
        return self._make_optimizer(rates)

    @property
    def current_iteration(self) -> int:
        """The outer iteration the schedules (multi-step loss, derivative order) are at."""
        return int(self.iteration) if hasattr(self, "iteration") else 0

    def uses_first_order(self) -> bool:
        """Whether the next meta-gradient is first order (FOMAML, or derivative-order annealing)."""
        return self.first_order or self.current_iteration < self.first_order_iterations

    def step_weights(self) -> list[float] | None:
        """The multi-step loss weights of the next meta-gradient (one per inner step), or None:
        only the query loss after the last step."""
        if not self.multi_step_loss_iterations:
            return None
        return multi_step_loss_weights(self.inner_steps, self.current_iteration, self.multi_step_loss_iterations)

    def _loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        return task_loss(self.task, output, target) if self.loss_fn is None else self.loss_fn(output, target)

    def _metrics(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        return task_metrics(self.task, output, target, self.loss_fn)

    def _hooks(self, training: bool, update: bool = True) -> StepHooks | None:
        """Per-step BatchNorm hooks; training statistics are updated only when gradients are on (and
        `update`: not when checkpointing replays a step)."""
        if self.step_norm is None:
            return None
        return self.step_norm.hooks(training, update=update and training and torch.is_grad_enabled())

    def _check_steps(self, steps: int) -> int:
        if (self.per_step_lrs is not None or self.step_norm is not None) and steps > self.inner_steps:
            raise ValueError(f"this learner has per-step rates or BatchNorm for {self.inner_steps} inner steps; "
                             f"{steps} were asked for (use at most {self.inner_steps})")
        return steps

    def _forward_at(self, params: Params, step: int, x: Tensor, hooks: StepHooks | None) -> Tensor:
        """The model at the parameters of inner step `step`, with that step's BatchNorm (if per step)."""
        if hooks is None:
            return forward(self.model, params, x)
        with hooks.context(step):
            return forward(self.model, {**params, **hooks.params(step)}, x)

    def _task_forward(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, steps: int, first_order: bool,
                      hooks: StepHooks | None, qy: Tensor | None = None, weights: Sequence[float] | None = None,
                      with_loss: bool = True):
        """Adapts on the support set; returns the query output after the last step, the query loss
        (multi-step with `weights`; None without `qy` or `with_loss`; `qy` also feeds the query hook)
        and the support loss before adapting."""
        chosen = range(steps, steps + 1) if weights is None else [k for k in range(1, steps + 1)
                                                                  if weights[k - 1] > 0 or k == steps]
        with self._autocast():
            points, support_loss = self._adapt_task(params, sx, sy, steps, first_order, hooks)
            outputs = {k: self._forward_at(points[k], k, self._query_inputs(points[k], k, qx, qy, hooks), hooks)
                       for k in chosen}
        if self.precision == "bf16":
            outputs = {k: o.float() for k, o in outputs.items()}
        if qy is None or not with_loss:
            return outputs[steps], None, support_loss
        loss = (self._loss_fn(outputs[steps], qy) if weights is None
                else sum(weights[k - 1] * self._loss_fn(o, qy) for k, o in outputs.items()))
        loss = loss + self.seams.outer(points[steps], points[0])
        if self.seams.query_term is not None:
            with hooks.context(steps) if hooks is not None else contextlib.nullcontext():
                loss = loss + self.seams.query({**points[steps], **(hooks.params(steps) if hooks else {})}, qx, qy)
        return outputs[steps], loss, support_loss

    def _query_inputs(self, params: Params, step: int, x: Tensor, y: Tensor | None, hooks: StepHooks | None) -> Tensor:
        """The query inputs through the query hook (which needs the labels) at step `step`'s parameters."""
        if self.seams.query_hook is None or y is None:
            return x
        return self.seams.query_inputs({**params, **(hooks.params(step) if hooks is not None else {})}, x, y)

    def _adapt_task(self, params: Params, sx: Tensor, sy: Tensor, steps: int, first_order: bool,
                    hooks: StepHooks | None) -> tuple[list[Params], Tensor]:
        """One task's inner loop (`functional.adapt`): the whole parameter dicts θ_0 .. θ_steps and
        the support loss before adapting."""
        adapted = {n: params[n] for n in self.adapt_names}
        frozen = {n: p for n, p in params.items() if n not in adapted}
        trajectory = adapt(model_support_loss(self.model, sx, sy, loss_fn=self.inner_loss_fn or self._loss_fn,
                                              frozen=frozen, hooks=hooks,
                                              seams=self.seams if self.seams.active else None),
                           adapted, optimizer=self.inner_optimizer_for_task(), steps=steps, first_order=first_order)
        return [{**frozen, **point} for point in trajectory.points], trajectory.losses[0]

    def _autocast(self) -> contextlib.AbstractContextManager:
        return mixed_precision(_AUTOCAST[self.precision])

    # -- the API ------------------------------------------------------------------------------
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> AdaptedModel:
        """Adapts to one task's support set and returns the adapted predictor.

        Differentiable w.r.t. the meta-parameters (unless `first_order`) when grad mode is on, and
        w.r.t. `support_x` when it requires grad (then second order whatever `first_order`: the
        inner gradients depend on the support set; an attack that poisons it needs that).
        With per-step BatchNorm statistics it adapts and predicts as evaluation does (normalised
        by the running statistics).

        Example:
            >>> import torch
            >>> from fastadapt.nn import Conv4
            >>> maml = MAML(Conv4.omniglot(ways=5), inner_lr=0.4)
            >>> learner = maml.adapt(torch.rand(5, 1, 28, 28), torch.arange(5))
            >>> learner(torch.rand(3, 1, 28, 28)).shape
            torch.Size([3, 5])
        """
        steps = self._check_steps(steps or self.inner_steps)
        hooks = self._hooks(training=False)
        first_order = self.first_order and not support_x.requires_grad
        points, _ = self._adapt_task(self.meta_params(), support_x, support_y, steps, first_order, hooks)
        if hooks is None:
            return AdaptedModel(self.model, points[-1])
        return AdaptedModel(self.model, {**points[-1], **hooks.params(steps)}, context=lambda: hooks.context(steps))

    def clone(self, first_order: bool | None = None) -> Clone:
        """A differentiable copy of the parameters for your own inner loop, with any loss
        (`algorithms.clone`): `clone.adapt(loss)` takes one inner step (second order unless
        `first_order`, default the learner's), `clone(x)` predicts, and a loss of it reaches the
        meta-parameters with `backward()`.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> maml = MAML(torch.nn.Linear(3, 2), inner_lr=0.1)
            >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
            >>> clone = maml.clone()
            >>> clone.adapt(F.cross_entropy(clone(x), y))
            >>> clone(x).shape
            torch.Size([4, 2])
        """
        return Clone(self, first_order)

    def meta_loss(self, batch: TaskBatch, initial: Params | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean query loss over the batch after adaptation, and detached metrics (means over tasks).

        Metrics: `loss`, `accuracy` (classification), `support_loss` (before adaptation). During
        the multi-step-loss phase the loss is the weighted multi-step loss (metrics: after the last
        step). `loss.backward()` gives the exact meta-gradient. With gradients enabled, advances
        `iteration` (the schedules' clock).

        `initial` (optional): per-task initial parameters, `{name: (T, *p.shape)}` for some or all
        of the model's parameters, in place of the shared initialisation (samples of a learned
        distribution, particles); the meta-gradient flows into whatever they were made from.
        """
        first_order, weights = self.uses_first_order(), self.step_weights()
        initial = self._check_initial(initial, len(batch))
        with fixed_structure(self.model):
            plan = self.plan(batch)
            if plan.path == "vmap":
                losses, metrics = self._vmapped(batch, self.inner_steps, first_order, weights, initial)
                result = losses.mean(), {k: v.mean() for k, v in metrics.items()}
            elif plan.path == "graph":
                result = self._with_graphs(batch, first_order, weights, initial)
            else:
                result = self._taskwise(plan, batch, first_order, weights, initial)
        if hasattr(self, "iteration") and torch.is_grad_enabled():
            self.iteration += 1
        return result

    def _check_initial(self, initial: Params | None, tasks: int) -> Params:
        if not initial:
            return {}
        params = self.meta_params()
        for name, value in initial.items():
            if name not in params:
                raise ValueError(f"initial names {name!r}, not a parameter of the model; it has {sorted(params)}")
            expected = (tasks, *params[name].shape)
            if tuple(value.shape) != expected:
                raise ValueError(f"initial[{name!r}] must have shape {expected} (one per task), got {tuple(value.shape)}")
        return dict(initial)

    def plan(self, batch: TaskBatch) -> Plan:
        """How `meta_loss(batch)` runs now, and why (`functional.planner`). Per-task initial
        parameters are data, not functions of yours: they run on whatever path the batch would.

        Example:
            >>> import torch
            >>> from fastadapt.nn import MLP
            >>> from fastadapt.data import SinusoidTasks
            >>> MAML(MLP(1, [8], 1), task="regression").plan(SinusoidTasks().task_batch(0, 2)).path
            'vmap'
        """
        trainable = any(p.requires_grad for p in self.parameters())
        yours = [what for what, on in (("a loss_fn", self.loss_fn is not None or self.inner_loss_fn is not None),
                                       ("hooks or terms", self.seams.active)) if on]
        return plan_meta_batch(self.model, batch, request=self.execution, user_functions=", ".join(yours) or None,
                               differentiate=torch.is_grad_enabled() and trainable,
                               per_task_statistics=self.step_norm is not None and self.step_norm.statistics,
                               task_group=self.task_group, task_workers=1 if self.compile else self.task_workers)

    def _task_metrics(self, batch: TaskBatch, inner_steps: int | None) -> dict[str, Tensor]:
        """Also `loss_before`, the query loss before adapting."""
        params = {k: v.detach() for k, v in self.meta_params().items()}
        hooks = self._hooks(training=False)
        outputs = self._query_outputs(batch, inner_steps)
        rows = []
        for t in range(len(batch)):
            ep = batch[t]
            row = self._metrics(outputs[t], ep.query_y)
            row["loss_before"] = self._loss_fn(self._forward_at(params, 0, ep.query_x, hooks), ep.query_y)
            rows.append(row)
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def _query_outputs(self, batch: TaskBatch, inner_steps: int | None) -> Tensor:
        steps = self._check_steps(inner_steps or self.inner_steps)
        params = {k: v.detach() for k, v in self.meta_params().items()}
        hooks = self._hooks(training=False)
        outputs = []
        with fixed_structure(self.model):
            for t in range(len(batch)):
                ep = batch[t]
                after, _, _ = self._task_forward(params, ep.support_x, ep.support_y, ep.query_x, steps, True, hooks,
                                                 ep.query_y, with_loss=False)
                outputs.append(after)
        return torch.stack(outputs)

    # -- execution strategies -----------------------------------------------------------------
    def _with_graphs(self, batch: TaskBatch, first_order: bool, weights: list[float] | None, initial: Params
                     ) -> tuple[Tensor, dict[str, Tensor]]:
        """Task after task, every task's graph kept: the loss supports any further autograd use."""
        shared = self.meta_params()
        hooks = self._hooks(training=True)
        losses, rows = [], []
        for t in range(len(batch)):
            ep = batch[t]
            params = {**shared, **{n: v[t] for n, v in initial.items()}}
            out, loss, support_loss = self._task_forward(params, ep.support_x, ep.support_y, ep.query_x,
                                                         self.inner_steps, first_order, hooks, ep.query_y, weights)
            losses.append(loss)
            rows.append({**self._metrics(out, ep.query_y), "support_loss": support_loss.detach()})
        return torch.stack(losses).mean(), {k: torch.stack([r[k] for r in rows]).mean() for k in rows[0]}

    def _taskwise(self, plan: Plan, batch: TaskBatch, first_order: bool, weights: list[float] | None,
                  initial: Params) -> tuple[Tensor, dict[str, Tensor]]:
        """Task groups (or single tasks) back-propagated as soon as their loss exists (`functional.rules`)."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        grouped = plan.path == "task-groups"
        grads, outputs, losses, support_losses = meta_gradients(
            task_batched_forward(self.model) if grouped else looped_forward(self.model), self.meta_params(), batch,
            loss_fn=self._loss_fn, steps=self.inner_steps, optimizer=self.inner_optimizer_for_task(),
            names=self.adapt_names, first_order=first_order, query_pass=self._query_pass, wrt=trainable,
            group=plan.group, autocast_dtype=_AUTOCAST[self.precision], checkpoint=self.checkpoint_inner_loop,
            hooks=self._hooks(training=True), replay_hooks=self._hooks(training=True, update=False),
            step_weights=weights, workers=plan.workers, vmap_loss=self.loss_fn is None, seams=self.seams,
            initial=initial, support_loss_fn=self.inner_loss_fn)
        rows = [self._metrics(out, batch.query_y[t]) for t, out in enumerate(outputs)]
        metrics = {k: torch.stack([r[k] for r in rows]).mean() for k in rows[0]}
        metrics["support_loss"] = support_losses.mean()
        return loss_with_grads(losses.mean(), [*trainable, *initial.values()], grads), metrics

    def _vmapped(self, batch: TaskBatch, steps: int, first_order: bool, weights: list[float] | None,
                 initial: Params | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        shared = self.meta_params()

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, own: Params):
            params = {**shared, **own}
            out, loss, support_loss = self._task_forward(params, sx, sy, qx, steps, first_order, None, qy, weights)
            row = self._metrics(out, qy)
            row["support_loss"] = support_loss.detach()
            return loss, row

        return vmap(one_task, randomness="different")(batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                                                      initial or {})


def _select(model: nn.Module, adapt: str | Sequence[str] | None) -> list[str]:
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if adapt is None:
        return names
    prefixes = [adapt] if isinstance(adapt, str) else list(adapt)
    chosen = [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
    if not chosen:
        tops = sorted({n.split(".")[0] for n in names})
        raise ValueError(f"adapt={prefixes!r} matches no parameter of the model; top-level names are {tops}")
    return chosen


class MAML(GradientLearner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017), second order. See `GradientLearner`."""


class FOMAML(GradientLearner):
    """First-order MAML: inner gradients are constants in the meta-gradient. See `GradientLearner`."""

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, **options) -> None:
        super().__init__(model, inner_lr, inner_steps, first_order=True, **options)


class MetaSGD(GradientLearner):
    """Meta-SGD (Li et al. 2017): learned per-parameter inner step sizes. See `GradientLearner`."""

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, **options) -> None:
        super().__init__(model, inner_lr, inner_steps, learn_inner_lr=True, **options)


class ANIL(GradientLearner):
    """Almost No Inner Loop (Raghu et al. 2020): only `adapt` (default "head") adapts."""

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, adapt: str | Sequence[str] = "head", **options) -> None:
        super().__init__(model, inner_lr, inner_steps, adapt=adapt, **options)
