"""Implicit MAML (Rajeswaran, Finn, Kakade and Levine 2019, "Meta-Learning with Implicit Gradients").

Each task solves a proximally regularised inner problem from phi = theta,

    phi*(theta) = argmin_phi  L_support(phi) + lam/2 ||phi - theta||^2,

with `inner_steps` steps of SGD or Adam that keep no graph from one step to the next. At a
stationary point the implicit function theorem gives d phi*/d theta = (I + H/lam)^-1, with H the
Hessian of the support loss at phi*, so the task's meta-gradient is the solution g of

    (I + (H + damping I)/lam) g = grad L_query(phi)

found by `cg_steps` iterations of conjugate gradient on Hessian-vector products (a double
backward through the support loss at phi). Memory holds one support graph and one query graph,
whatever the number of inner steps; compute is k inner steps plus `cg_steps` Hessian-vector
products. `damping` (0 in the paper's equation) adds `damping * I` to H, which keeps the system
positive definite where the support loss's curvature is not below -(lam + damping); conjugate
gradient also stops along a direction of non-positive curvature (truncated CG) instead of stepping
to infinity. The authors' code solves (2 I + H / (lam + 10)) g = grad, for lam = 2 the system
here with damping 22 up to a constant factor (see docs/methods/imaml.md and recipes/imaml/).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..data.episodes import TaskBatch
from ..functional import Params, add_gradients, forward, loss_with_grads
from .gradient import AdaptedModel
from .objectives import TaskKind, check_kind, task_loss, task_metrics

__all__ = ["IMAML", "conjugate_gradient", "proximal_adapt"]

IMAMLInnerOptimizer = Literal["sgd", "adam"]
Vectors = list[Tensor]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def conjugate_gradient(matvec: Callable[[Vectors], Vectors], b: Sequence[Tensor], steps: int) -> Vectors:
    """`steps` iterations of conjugate gradient for `A x = b` from x = 0; `A` symmetric, given by `matvec`.

    Vectors are lists of tensors (one per parameter). No `.item()` sync: where a search direction
    meets non-positive curvature (`p'Ap <= 0`, an indefinite `A`) or the residual is exactly zero,
    the iteration stops in place (truncated CG), so the result is always finite.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x = conjugate_gradient(lambda v: [A @ v[0]], [torch.tensor([1.0, 2.0], dtype=torch.float64)], 2)
        >>> torch.allclose(A @ x[0], torch.tensor([1.0, 2.0], dtype=torch.float64))
        True
    """
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = _dot(r, r)
    active = rs > 0
    for _ in range(steps):
        ap = matvec(p)
        curvature = _dot(p, ap)
        active = active & (curvature > 0)
        alpha = torch.where(active, rs / torch.where(active, curvature, 1.0), 0.0)
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, ap)]
        rs_new = _dot(r, r)
        active = active & (rs_new > 0)
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
        p = [ri + beta * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x


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
) -> tuple[Params, Tensor]:
    """Approximately minimises `loss_fn(model(x; phi), y) + lam/2 ||phi - theta||^2` from phi = theta.

    `steps` steps of `torch.optim.SGD` or `torch.optim.Adam` on a detached copy of `theta` (no
    graph survives a step, so memory does not grow with `steps`; works under `torch.no_grad()`).
    `frozen` parameters take part in the forward pass but do not adapt. Returns the adapted
    (detached) parameters and the support loss at theta.

    Example:
        >>> m = torch.nn.Linear(1, 1)
        >>> theta = {k: v.detach() for k, v in m.named_parameters()}
        >>> phi, _ = proximal_adapt(m, theta, torch.ones(4, 1), torch.zeros(4, 1),
        ...                         loss_fn=torch.nn.functional.mse_loss, steps=3, lr=0.1, lam=1.0)
        >>> sorted(phi)
        ['bias', 'weight']
    """
    phi = {name: t.detach().clone().requires_grad_(True) for name, t in theta.items()}
    fixed = {name: t.detach() for name, t in (frozen or {}).items()}
    leaves = list(phi.values())
    opt: torch.optim.Optimizer = (torch.optim.Adam(leaves, lr=lr) if optimizer == "adam"
                                  else torch.optim.SGD(leaves, lr=lr))
    first_loss = None
    with torch.enable_grad():
        for _ in range(steps):
            loss = loss_fn(forward(model, {**fixed, **phi}, x), y)
            grads = torch.autograd.grad(loss, leaves, materialize_grads=True)
            if first_loss is None:
                first_loss = loss.detach()
            with torch.no_grad():
                for name, g in zip(phi, grads):
                    phi[name].grad = g + lam * (phi[name] - theta[name].detach())
            opt.step()
    assert first_loss is not None
    return {name: t.detach() for name, t in phi.items()}, first_loss


class IMAML(nn.Module):
    """Implicit MAML over any `nn.Module`: proximal inner problem, implicit meta-gradient by CG.

    Args:
        model: any module; its trainable parameters are the meta-parameters theta.
        inner_lr: step size of the inner optimizer.
        inner_steps: inner optimizer steps, in training and (by default) evaluation.
        lam: strength of the proximal term lam/2 ||phi - theta||^2 (> 0).
        cg_steps: conjugate-gradient iterations for the meta-gradient (>= 1).
        cg_damping: added to the Hessian of the support loss in the linear system (>= 0).
        inner_optimizer: "sgd" (the paper's iMAML-GD) or "adam".
        task: "classification" (cross-entropy, accuracy) or "regression" (MSE).

    `adapt` and evaluation solve the same regularised inner problem as training.

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
        task: TaskKind = "classification",
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
        if not cg_damping >= 0:
            raise ValueError(f"cg_damping must be >= 0, got {cg_damping!r}")
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"inner_optimizer must be 'sgd' or 'adam', got {inner_optimizer!r}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.lam = float(lam)
        self.cg_steps = cg_steps
        self.cg_damping = float(cg_damping)
        self.inner_optimizer: IMAMLInnerOptimizer = inner_optimizer
        self.task = check_kind(task)

    # -- the pieces ---------------------------------------------------------------------------
    def _loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        return task_loss(self.task, output, target)

    def _split(self) -> tuple[Params, Params]:
        """(trainable meta-parameters, frozen parameters), both detached."""
        params = dict(self.model.named_parameters())
        return ({k: p.detach() for k, p in params.items() if p.requires_grad},
                {k: p.detach() for k, p in params.items() if not p.requires_grad})

    def _solve(self, theta: Params, frozen: Params, x: Tensor, y: Tensor, steps: int) -> tuple[Params, Tensor]:
        return proximal_adapt(self.model, theta, x, y, loss_fn=self._loss_fn, steps=steps, lr=self.inner_lr,
                              lam=self.lam, optimizer=self.inner_optimizer, frozen=frozen)

    def implicit_gradient(self, phi: Params, frozen: Params, support: tuple[Tensor, Tensor],
                          query: tuple[Tensor, Tensor]) -> tuple[Vectors, Tensor, Tensor]:
        """The task's meta-gradient at the adapted `phi` (one tensor per entry of `phi`), the query
        output and the query loss: CG on `(I + (H + damping I)/lam) g = grad L_query(phi)`."""
        names = list(phi)
        with torch.enable_grad():
            leaves = [phi[n].detach().requires_grad_(True) for n in names]
            point = {**frozen, **dict(zip(names, leaves))}
            out = forward(self.model, point, query[0])
            query_loss = self._loss_fn(out, query[1])
            v = list(torch.autograd.grad(query_loss, leaves, materialize_grads=True))
            support_loss = self._loss_fn(forward(self.model, point, support[0]), support[1])
            support_grad = torch.autograd.grad(support_loss, leaves, create_graph=True, materialize_grads=True)
            # entries that do not depend on phi (e.g. a conv bias BatchNorm removes) have zero Hessian rows
            linked = [i for i, s in enumerate(support_grad) if s.requires_grad]
            scale = 1.0 / self.lam

            def matvec(u: Vectors) -> Vectors:
                hvp = torch.autograd.grad([support_grad[i] for i in linked], leaves, grad_outputs=[u[i] for i in linked],
                                          retain_graph=True, materialize_grads=True)
                return [ui + scale * (hi + self.cg_damping * ui) for ui, hi in zip(u, hvp)]

            g = conjugate_gradient(matvec, v, self.cg_steps)
        return [t.detach() for t in g], out.detach(), query_loss.detach()

    # -- the API ------------------------------------------------------------------------------
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> AdaptedModel:
        """Solves one task's inner problem and returns the adapted predictor (model untouched).

        Example:
            >>> from fastadapt.nn import Conv4
            >>> learner = IMAML(Conv4.omniglot(ways=5), inner_steps=2).adapt(torch.rand(5, 1, 28, 28), torch.arange(5))
            >>> learner(torch.rand(3, 1, 28, 28)).shape
            torch.Size([3, 5])
        """
        theta, frozen = self._split()
        phi, _ = self._solve(theta, frozen, support_x, support_y, steps or self.inner_steps)
        return AdaptedModel(self.model, {**frozen, **phi})

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean query loss after adaptation and detached metrics (means over tasks).

        `loss.backward()` deposits the implicit meta-gradient averaged over tasks. Metrics: `loss`,
        `accuracy` (classification), `support_loss` (before adaptation).
        """
        theta, frozen = self._split()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        differentiate = torch.is_grad_enabled() and bool(trainable)
        total, losses, rows = None, [], []
        for t in range(len(batch)):
            ep = batch[t]
            phi, support_loss = self._solve(theta, frozen, ep.support_x, ep.support_y, self.inner_steps)
            if differentiate:
                g, out, loss = self.implicit_gradient(phi, frozen, (ep.support_x, ep.support_y),
                                                      (ep.query_x, ep.query_y))
                total = add_gradients(total, [gi / len(batch) for gi in g])
            else:
                out = forward(self.model, {**frozen, **phi}, ep.query_x).detach()
                loss = self._loss_fn(out, ep.query_y)
            losses.append(loss)
            row = task_metrics(self.task, out, ep.query_y)
            row["support_loss"] = support_loss
            rows.append(row)
        mean_loss = torch.stack(losses).mean()
        metrics = {k: torch.stack([r[k] for r in rows]).mean() for k in rows[0]}
        return (loss_with_grads(mean_loss, trainable, total) if differentiate else mean_loss), metrics

    @torch.no_grad()
    def task_metrics(self, batch: TaskBatch, inner_steps: int | None = None) -> dict[str, Tensor]:
        """Per-task `loss`, `accuracy` (classification) and `loss_before` after adapting, `(T,)` tensors."""
        steps = inner_steps or self.inner_steps
        theta, frozen = self._split()
        params = {**frozen, **theta}
        rows = []
        for t in range(len(batch)):
            ep = batch[t]
            phi, _ = self._solve(theta, frozen, ep.support_x, ep.support_y, steps)
            row = task_metrics(self.task, forward(self.model, {**frozen, **phi}, ep.query_x), ep.query_y)
            row["loss_before"] = self._loss_fn(forward(self.model, params, ep.query_x), ep.query_y)
            rows.append(row)
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
