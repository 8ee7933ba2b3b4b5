"""Reptile (Nichol, Achiam & Schulman 2018): move the initialisation toward task-adapted weights.

Per task, the inner loop takes `inner_steps` first-order steps of SGD, momentum or Adam (the
paper's Adam has beta1 = 0; `functional.optim`) on shuffled mini-batches of the support set, from
the meta-parameters theta to phi_t; no outer graph is built. `meta_loss(batch)` returns a loss whose `backward()` deposits
`theta - mean_t(phi_t)`, so an outer `torch.optim.SGD(lr=epsilon)` (no momentum) step is exactly
`theta += epsilon * (mean_t(phi_t) - theta)`: the serial version with a meta-batch of one, the
batched version with more. Any other outer optimizer (Adam: "Reptile with Adam outer") takes the
same direction as its gradient.

Randomness: training draws the mini-batch order from torch's global generator (seeded by the
experiment, saved in checkpoints); evaluation (`adapt`, `task_metrics`) draws it from a generator
seeded with `shuffle_seed` for every task, so an evaluated episode is a pure function of itself.
Unlike the paper's TensorFlow code, Adam's moments start from zero for every task, so tasks are
independent of each other and of their order in the meta-batch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..data.episodes import TaskBatch
from ..functional import InnerOptimizer, LossFn, Params, adam, add_gradients, forward, loss_with_grads, momentum, sgd
from .gradient import AdaptedModel
from .objectives import TaskKind, check_kind, task_loss, task_metrics

__all__ = ["Reptile", "fine_tune", "minibatch_order", "reptile_optimizer"]

InnerOptimizerName = Literal["sgd", "momentum", "adam"]


def minibatch_order(n: int, batch_size: int | None, steps: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """Indices of `steps` mini-batches over `n` examples, as the paper's code samples them.

    Shuffled passes over the examples, cut into consecutive batches of `batch_size` (a batch may
    span two passes). `batch_size=None` or `>= n` means every step sees all `n` examples, unshuffled.

    Example:
        >>> [b.tolist() for b in minibatch_order(4, None, 2)]
        [[0, 1, 2, 3], [0, 1, 2, 3]]
        >>> order = minibatch_order(6, 4, 3, torch.Generator().manual_seed(0))
        >>> [len(b) for b in order], sorted(torch.cat(order)[:6].tolist())
        ([4, 4, 4], [0, 1, 2, 3, 4, 5])
    """
    if batch_size is None or batch_size >= n:
        return [torch.arange(n)] * steps
    passes = math.ceil(steps * batch_size / n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])
    return list(order[: steps * batch_size].view(steps, batch_size))


def fine_tune(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    steps: int,
    optimizer: InnerOptimizer,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Params, Tensor]:
    """First-order fine-tuning of `params` on `(x, y)`: `steps` optimizer steps on mini-batches.

    `optimizer` is a `functional.optim` optimizer (fresh state: Adam's moments start at zero).
    No graph is kept. Returns the adapted parameters and the loss on the first mini-batch.

    Example:
        >>> from fastadapt.functional import adam
        >>> _ = torch.manual_seed(0)
        >>> m, mse = torch.nn.Linear(1, 1), torch.nn.functional.mse_loss
        >>> x, y = torch.randn(8, 1), torch.zeros(8, 1)
        >>> p = {k: v.detach() for k, v in m.named_parameters()}
        >>> new, first = fine_tune(m, p, x, y, loss_fn=mse, steps=20, optimizer=adam(0.1), batch_size=4)
        >>> bool(mse(forward(m, new, x), y) < first)
        True
    """
    point = {name: p.detach() for name, p in params.items()}
    state = optimizer.init(point)
    first_loss: Tensor | None = None
    for index in minibatch_order(x.shape[0], batch_size, steps, generator):
        with torch.enable_grad():  # also under an outer no_grad (evaluation)
            leaves = {name: p.detach().requires_grad_() for name, p in point.items()}
            loss = loss_fn(forward(model, leaves, x[index]), y[index])
            grads = torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True)
        first_loss = loss.detach() if first_loss is None else first_loss
        point, state = optimizer.update(dict(zip(leaves, grads)), state, point)
    assert first_loss is not None
    return point, first_loss


def reptile_optimizer(name: InnerOptimizerName, lr: float, adam_betas: tuple[float, float] = (0.0, 0.999)) -> InnerOptimizer:
    """Reptile's inner optimizer by name: "sgd", "momentum" (beta 0.9) or "adam" (the paper's beta1 = 0).

    Example:
        >>> reptile_optimizer("adam", 1e-3).init({"w": torch.zeros(1)}).count
        0
    """
    if name == "adam":
        return adam(lr, betas=adam_betas)
    if name not in ("sgd", "momentum"):
        raise ValueError(f"inner_optimizer must be 'sgd', 'momentum' or 'adam', got {name!r}")
    return sgd(lr) if name == "sgd" else momentum(lr)


class Reptile(nn.Module):
    """Reptile over any `nn.Module`: its parameters are the meta-learned initialisation.

    Args:
        model: any module (for classification, with a `ways`-sized output).
        inner_lr: inner optimizer step size (the paper: Adam, 1e-3 for 5-way Omniglot).
        inner_steps: inner mini-batch steps per task in training.
        inner_optimizer: "sgd", "momentum" or "adam" (first order; the paper: Adam with beta1 = 0).
        inner_batch: mini-batch size of the inner loop; None: the whole support set every step.
        eval_inner_steps: steps when adapting at test time (the paper: 50); None: `inner_steps`.
        eval_inner_batch: mini-batch size at test time; None: `inner_batch`.
        adam_betas: the inner Adam's (beta1, beta2).
        task: "classification" (cross-entropy) or "regression" (MSE).
        shuffle_seed: seed of the mini-batch order at test time, the same for every task.

    Example:
        >>> from fastadapt.nn import MLP
        >>> from fastadapt.data import SinusoidTasks
        >>> reptile = Reptile(MLP(), inner_lr=0.02, inner_steps=5, inner_optimizer="sgd", task="regression")
        >>> opt = torch.optim.SGD(reptile.parameters(), lr=0.1)  # epsilon of the paper
        >>> loss, metrics = reptile.meta_loss(SinusoidTasks().task_batch(0, 4))
        >>> loss.backward(); opt.step()  # theta += 0.1 * (mean phi - theta)
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 1e-3,
        inner_steps: int = 5,
        *,
        inner_optimizer: InnerOptimizerName = "adam",
        inner_batch: int | None = None,
        eval_inner_steps: int | None = None,
        eval_inner_batch: int | None = None,
        adam_betas: tuple[float, float] = (0.0, 0.999),
        task: TaskKind = "classification",
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        _check_count("inner_steps", inner_steps, optional=False)
        for name, value in (("eval_inner_steps", eval_inner_steps), ("inner_batch", inner_batch),
                            ("eval_inner_batch", eval_inner_batch)):
            _check_count(name, value, optional=True)
        self.inner_opt = reptile_optimizer(inner_optimizer, inner_lr, adam_betas)  # checks all three
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.inner_optimizer: InnerOptimizerName = inner_optimizer
        self.inner_batch = inner_batch
        self.eval_inner_steps = eval_inner_steps or inner_steps
        self.eval_inner_batch = eval_inner_batch if eval_inner_batch is not None else inner_batch
        self.task = check_kind(task)
        self.shuffle_seed = shuffle_seed

    def _loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        return task_loss(self.task, output, target)

    def _fine_tune(self, params: Params, x: Tensor, y: Tensor, steps: int, batch_size: int | None,
                   generator: torch.Generator | None) -> tuple[Params, Tensor]:
        return fine_tune(self.model, params, x, y, loss_fn=self._loss_fn, steps=steps, optimizer=self.inner_opt,
                         batch_size=batch_size, generator=generator)

    def _eval_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.shuffle_seed)

    def _theta(self) -> Params:
        """The trainable meta-parameters, detached: what the inner loop adapts (frozen ones stay the module's)."""
        return {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> AdaptedModel:
        """Fine-tunes on one task's support set (`eval_inner_steps`, `eval_inner_batch`); returns the predictor.

        Example:
            >>> from fastadapt.nn import Conv4
            >>> learner = Reptile(Conv4.omniglot(ways=5), eval_inner_steps=2).adapt(torch.rand(5, 1, 28, 28), torch.arange(5))
            >>> learner(torch.rand(3, 1, 28, 28)).shape
            torch.Size([3, 5])
        """
        phi, _ = self._fine_tune(self._theta(), support_x, support_y, steps or self.eval_inner_steps,
                                 self.eval_inner_batch, self._eval_generator())
        return AdaptedModel(self.model, phi)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The Reptile direction for the batch, as a loss to call `backward()` on, and metrics.

        `loss.backward()` deposits `theta - mean_t(phi_t)` in the trainable parameters. The loss
        value (and metric `loss`, `accuracy`) is the mean query loss after adaptation, for
        monitoring; `support_loss` is the loss on each task's first inner mini-batch.
        """
        theta = self._theta()
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]  # theta's order
        total: list[Tensor | None] | None = None
        rows = []
        for t in range(len(batch)):
            ep = batch[t]
            phi, support_loss = self._fine_tune(theta, ep.support_x, ep.support_y, self.inner_steps,
                                                self.inner_batch, None)
            total = add_gradients(total, [theta[name] - phi[name] for name, _ in named])
            with torch.no_grad():
                row = task_metrics(self.task, forward(self.model, phi, ep.query_x), ep.query_y)
            row["support_loss"] = support_loss
            rows.append(row)
        metrics = {k: torch.stack([r[k] for r in rows]).mean() for k in rows[0]}
        direction = [g / len(batch) for g in total or []]  # type: ignore[operator]
        return loss_with_grads(metrics["loss"], [p for _, p in named], direction), metrics

    @torch.no_grad()
    def task_metrics(self, batch: TaskBatch, inner_steps: int | None = None) -> dict[str, Tensor]:
        """Per-task `loss`, `accuracy` (classification) and `loss_before` after fine-tuning, `(T,)` tensors."""
        steps = inner_steps or self.eval_inner_steps
        theta = self._theta()
        rows = []
        for t in range(len(batch)):
            ep = batch[t]
            phi, _ = self._fine_tune(theta, ep.support_x, ep.support_y, steps, self.eval_inner_batch,
                                     self._eval_generator())
            row = task_metrics(self.task, forward(self.model, phi, ep.query_x), ep.query_y)
            row["loss_before"] = self._loss_fn(forward(self.model, theta, ep.query_x), ep.query_y)
            rows.append(row)
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _check_count(name: str, value: object, optional: bool) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{' or None' if optional else ''}, got {value!r}")
