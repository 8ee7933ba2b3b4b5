"""The meta-training loop: task batches from a source, an outer optimizer, metrics per step."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..data.sampler import TaskSource

__all__ = ["meta_train", "TrainingDiverged", "check_finite_losses"]

StepCallback = Callable[[int, dict[str, float]], None]


class TrainingDiverged(RuntimeError):
    """The meta-loss became NaN or infinite: the settings diverge (the message says from which step)."""


def check_finite_losses(losses: list[Tensor], last_step: int,
                        advice: Callable[[], str] = lambda: " Lower meta_lr or inner_lr and train again.") -> None:
    """Raises `TrainingDiverged` if any of the meta-losses of steps `last_step - len(losses) + 1 ..
    last_step` is NaN or infinite, naming the first such step (one sync for all of them); `advice()`
    (called only then) ends the message.

    Example:
        >>> check_finite_losses([torch.tensor(1.0), torch.tensor(float("nan"))], 10)
        Traceback (most recent call last):
        ...
        fastadapt.training.loop.TrainingDiverged: training diverged: the meta-loss is nan at outer step 10. Lower meta_lr or inner_lr and train again.
    """
    if not losses:
        return
    stacked = torch.stack([loss.detach() for loss in losses])
    bad = ~torch.isfinite(stacked)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise TrainingDiverged(f"training diverged: the meta-loss is {float(stacked[first])} at outer step "
                               f"{last_step - len(losses) + 1 + first}.{advice()}")


def meta_train(
    learner: Any,
    source: TaskSource,
    *,
    iterations: int,
    meta_batch: int,
    meta_lr: float = 1e-3,
    on_step: StepCallback | None = None,
    log_every: int = 50,
) -> list[dict[str, float]]:
    """Meta-trains `learner` with Adam on episodes `i*meta_batch ...` of `source`.

    Metrics stay tensors inside a step; they are read (one sync) only every `log_every` steps,
    averaged over those steps, and passed to `on_step(step, metrics)`. Returns that history.
    A NaN or infinite loss among them raises `TrainingDiverged` naming its step.

    Example:
        >>> from fastadapt import MAML, SinusoidTasks
        >>> from fastadapt.nn import MLP
        >>> history = meta_train(MAML(MLP(), 0.01, task="regression"), SinusoidTasks(), iterations=2, meta_batch=4, log_every=1)
        >>> len(history)
        2
    """
    for name, value in (("iterations", iterations), ("meta_batch", meta_batch), ("log_every", log_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    optimizer = torch.optim.Adam(learner.parameters(), lr=meta_lr)
    history: list[dict[str, float]] = []
    window: dict[str, list[Tensor]] = {}
    losses: list[Tensor] = []
    for step in range(1, iterations + 1):
        batch = source.task_batch((step - 1) * meta_batch, meta_batch)
        optimizer.zero_grad(set_to_none=True)
        loss, metrics = learner.meta_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        for name, value in metrics.items():
            window.setdefault(name, []).append(value)
        if step % log_every == 0 or step == iterations:
            check_finite_losses(losses, step)
            losses.clear()
            row = {name: float(torch.stack(values).mean()) for name, values in window.items()}
            window.clear()
            history.append({"step": step, **row})
            if on_step is not None:
                on_step(step, row)
    return history
