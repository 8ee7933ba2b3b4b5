"""One gradient-based meta-learner; MAML, FOMAML, Meta-SGD and ANIL are options of it.

- MAML: all parameters adapt, second-order through every inner step.
- FOMAML: inner gradients treated as constants (`first_order=True`).
- Meta-SGD: one learned step size per parameter entry (`learn_inner_lr=True`).
- ANIL: only the head adapts (`adapt="head"`), the body is shared by all tasks.

Execution over a `TaskBatch` (`execution=`):
- "loop": tasks one after another, each task back-propagated as soon as its loss exists so only
  one task's graph is alive (see `functional.taskwise`), in two passes: a first-order query pass
  (optionally compiled or bf16), then the backward through the support-set inner loop (see
  `functional.split`). The default for models with BatchNorm or convolutions: measured on 2 CPU
  cores it is as fast as holding all graphs at 5x less memory, and `torch.func.vmap` is both
  slower there and wrong in second order through training-mode BatchNorm.
- "graph": the same loop keeping every task's graph; the loss supports any further autograd use.
- "vmap": all tasks in one `torch.func.vmap` call; the default for models made only of layers
  whose vmap rules are exact (Linear, activations, Flatten, Dropout), e.g. the sinusoid MLP.
"""

from __future__ import annotations

import contextlib
from typing import Literal, Sequence

import torch
from torch import Tensor, nn
from torch.func import vmap

from ..data.episodes import TaskBatch
from ..functional import (Params, QueryPass, add_gradients, forward, inner_adapt, loss_with_grads, mixed_precision,
                          split_meta_gradients)
from ..functional.task_batched import batched_meta_gradients, task_batched_forward
from .objectives import TaskKind, check_kind, task_loss, task_metrics

__all__ = ["GradientLearner", "MAML", "FOMAML", "MetaSGD", "ANIL", "AdaptedModel"]

Execution = Literal["auto", "loop", "graph", "vmap"]
Precision = Literal["fp32", "bf16"]
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}

# Layers whose torch.func.vmap batching rules are exact also in second order (checked by tests).
_VMAP_SAFE = (
    nn.Linear, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Identity,
    nn.Flatten, nn.Dropout,
)


class AdaptedModel:
    """The model with task-adapted parameters: `learner(x)` predicts for that task.

    Holds parameters, not a copy of the module; calling it never changes the original model.
    """

    def __init__(self, model: nn.Module, params: Params) -> None:
        self.model = model
        self.params = params

    def __call__(self, x: Tensor) -> Tensor:
        return forward(self.model, self.params, x)


class GradientLearner(nn.Module):
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
        execution: how the meta-batch runs; see the module docstring.
        compile: compile the query pass of "loop" execution with `torch.compile` (one compilation
            per input shape, tens of seconds; needs a C++ compiler).
        precision: "bf16" runs forward and backward under CPU bf16 autocast; weights and
            meta-gradients stay float32.
        checkpoint_inner_loop: keep no graph across inner steps in "loop" execution; rebuild each
            step's graph during the backward, so memory does not grow with `inner_steps`.
        task_group: tasks whose support phase runs as one batched graph (Conv4-style models in
            "loop" execution, `functional.task_batched`); memory grows with it.

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
        task_group: int = 4,
    ) -> None:
        super().__init__()
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr!r}")
        if execution not in ("auto", "loop", "graph", "vmap"):
            raise ValueError(f"execution must be 'auto', 'loop', 'graph' or 'vmap', got {execution!r}")
        if precision not in _AUTOCAST:
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.task = check_kind(task)
        self.adapt_names = _select(model, adapt)
        self.inner_lrs = (
            nn.ParameterList(
                nn.Parameter(torch.full_like(p, inner_lr, requires_grad=True))
                for name, p in model.named_parameters()
                if name in self.adapt_names
            )
            if learn_inner_lr
            else None
        )
        has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if execution == "vmap" and has_batchnorm:
            raise ValueError(
                "execution='vmap' is refused for models with BatchNorm: torch.func.vmap gives wrong "
                "meta-gradients through training-mode batch_norm with per-task weights; use 'loop'"
            )
        if execution == "auto":
            leaves = [m for m in model.modules() if not list(m.children())]
            execution = "vmap" if all(isinstance(m, _VMAP_SAFE) for m in leaves) else "loop"
        self.execution: Execution = execution
        self.precision: Precision = precision
        self.checkpoint_inner_loop = checkpoint_inner_loop
        if not isinstance(task_group, int) or task_group < 1:
            raise ValueError(f"task_group must be an integer >= 1, got {task_group!r}")
        self.task_group = task_group
        self._query_pass = QueryPass(model, self._loss_fn, compile=compile, autocast_dtype=_AUTOCAST[precision])
        self._task_batched = task_batched_forward(model)

    # -- the pieces ---------------------------------------------------------------------------
    def meta_params(self) -> Params:
        """The model's parameters by name (views of the live ones: the initialisation)."""
        return dict(self.model.named_parameters())

    def step_sizes(self) -> dict[str, Tensor | float]:
        """Inner step size per adapted parameter: learned tensors (Meta-SGD) or the constant."""
        if self.inner_lrs is None:
            return {name: self.inner_lr for name in self.adapt_names}
        return dict(zip(self.adapt_names, self.inner_lrs))

    def _loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        return task_loss(self.task, output, target)

    def _adapt(self, params: Params, x: Tensor, y: Tensor, steps: int, first_order: bool) -> tuple[Params, Tensor | None]:
        return inner_adapt(
            self.model, params, x, y, loss_fn=self._loss_fn, steps=steps,
            step_sizes=self.step_sizes(), first_order=first_order,
        )

    def _task_forward(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, steps: int, first_order: bool):
        with self._autocast():
            adapted, support_loss = self._adapt(params, sx, sy, steps, first_order)
            output = forward(self.model, adapted, qx)
        return (output.float() if self.precision == "bf16" else output), support_loss

    def _autocast(self) -> contextlib.AbstractContextManager:
        return mixed_precision(_AUTOCAST[self.precision])

    # -- the API ------------------------------------------------------------------------------
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> AdaptedModel:
        """Adapts to one task's support set and returns the adapted predictor.

        Differentiable w.r.t. the meta-parameters (unless `first_order`) when grad mode is on.

        Example:
            >>> import torch
            >>> from fastadapt.nn import Conv4
            >>> maml = MAML(Conv4.omniglot(ways=5), inner_lr=0.4)
            >>> learner = maml.adapt(torch.rand(5, 1, 28, 28), torch.arange(5))
            >>> learner(torch.rand(3, 1, 28, 28)).shape
            torch.Size([3, 5])
        """
        params, _ = self._adapt(self.meta_params(), support_x, support_y, steps or self.inner_steps, self.first_order)
        return AdaptedModel(self.model, params)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean query loss over the batch after adaptation, and detached metrics (means over tasks).

        Metrics: `loss`, `accuracy` (classification), `support_loss` (before adaptation).
        `loss.backward()` gives the exact meta-gradient.
        """
        if self.execution == "vmap":
            losses, metrics = self._vmapped(batch, self.inner_steps, self.first_order)
            return losses.mean(), {k: v.mean() for k, v in metrics.items()}
        return self._looped(batch, keep_graph=self.execution == "graph")

    @torch.no_grad()
    def task_metrics(self, batch: TaskBatch, inner_steps: int | None = None) -> dict[str, Tensor]:
        """Per-task metrics after adaptation, with no outer graph: `(T,)` tensors.

        Includes `loss`, `accuracy` (classification) and `loss_before` (query loss before adapting).
        """
        steps = inner_steps or self.inner_steps
        params = {k: v.detach() for k, v in self.meta_params().items()}
        rows = []
        for t in range(len(batch)):
            ep = batch[t]
            after, _ = self._task_forward(params, ep.support_x, ep.support_y, ep.query_x, steps, True)
            row = task_metrics(self.task, after, ep.query_y)
            row["loss_before"] = self._loss_fn(forward(self.model, params, ep.query_x), ep.query_y)
            rows.append(row)
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    # -- execution strategies -----------------------------------------------------------------
    def _looped(self, batch: TaskBatch, keep_graph: bool) -> tuple[Tensor, dict[str, Tensor]]:
        params = self.meta_params()
        trainable = [p for p in self.parameters() if p.requires_grad]
        taskwise = not keep_graph and torch.is_grad_enabled() and bool(trainable)
        if taskwise and self._task_batched is not None:
            return self._support_batched(batch, params, trainable)
        count = len(batch)
        step_sizes = self.step_sizes()
        losses, rows, total = [], [], None
        for t in range(count):
            ep = batch[t]
            if taskwise:
                grads, out, loss, support_loss = split_meta_gradients(
                    self.model, params, (ep.support_x, ep.support_y), (ep.query_x, ep.query_y),
                    loss_fn=self._loss_fn, steps=self.inner_steps, step_sizes=step_sizes,
                    first_order=self.first_order, query_pass=self._query_pass, wrt=trainable, scale=1 / count,
                    checkpoint=self.checkpoint_inner_loop, autocast_dtype=_AUTOCAST[self.precision])
                total = add_gradients(total, grads)
            else:
                out, support_loss = self._task_forward(params, ep.support_x, ep.support_y, ep.query_x,
                                                        self.inner_steps, self.first_order)
                loss = self._loss_fn(out, ep.query_y)
            losses.append(loss)
            row = task_metrics(self.task, out, ep.query_y)
            row["support_loss"] = support_loss.detach()
            rows.append(row)
        mean_loss = torch.stack(losses).mean()
        if taskwise:
            mean_loss = loss_with_grads(mean_loss, trainable, total)
        return mean_loss, {k: torch.stack([r[k] for r in rows]).mean() for k in rows[0]}

    def _support_batched(self, batch: TaskBatch, params: Params, trainable: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        grads, outputs, losses, support_losses = batched_meta_gradients(
            self._task_batched, params, batch, loss_fn=self._loss_fn, steps=self.inner_steps,
            step_sizes=self.step_sizes(), first_order=self.first_order, query_pass=self._query_pass,
            wrt=trainable, autocast_dtype=_AUTOCAST[self.precision], group=self.task_group, checkpoint=self.checkpoint_inner_loop)
        rows = [task_metrics(self.task, out, batch.query_y[t]) for t, out in enumerate(outputs)]
        metrics = {k: torch.stack([r[k] for r in rows]).mean() for k in rows[0]}
        metrics["support_loss"] = support_losses.mean()
        return loss_with_grads(losses.mean(), trainable, grads), metrics

    def _vmapped(self, batch: TaskBatch, steps: int, first_order: bool) -> tuple[Tensor, dict[str, Tensor]]:
        params = self.meta_params()

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
            out, support_loss = self._task_forward(params, sx, sy, qx, steps, first_order)
            row = task_metrics(self.task, out, qy)
            row["support_loss"] = support_loss.detach()
            return self._loss_fn(out, qy), row

        return vmap(one_task, randomness="different")(batch.support_x, batch.support_y, batch.query_x, batch.query_y)


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
