"""What a task asks for: classification (cross-entropy, accuracy) or regression (mean squared error)."""

from __future__ import annotations

from typing import Callable, Literal

import torch.nn.functional as F
from torch import Tensor

__all__ = ["TaskKind", "task_loss", "task_metrics"]

TaskKind = Literal["classification", "regression"]


def task_loss(kind: TaskKind, output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy (logits vs integer labels) or mean squared error."""
    if kind == "classification":
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def task_metrics(kind: TaskKind, output: Tensor, target: Tensor,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """Detached per-task metrics: `loss` (`loss_fn`, default the task's), plus `accuracy` for classification.

    Example:
        >>> import torch
        >>> task_metrics("classification", torch.tensor([[2.0, 0.0]]), torch.tensor([0]))["accuracy"]
        tensor(1.)
    """
    output = output.detach()
    metrics = {"loss": task_loss(kind, output, target) if loss_fn is None else loss_fn(output, target).detach()}
    if kind == "classification":
        metrics["accuracy"] = (output.argmax(-1) == target).float().mean()
    return metrics


def check_kind(kind: str) -> TaskKind:
    if kind not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {kind!r}")
    return kind  # type: ignore[return-value]
