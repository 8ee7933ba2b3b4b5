"""What a task asks for: classification (cross-entropy, accuracy) or regression (mean squared error)."""

from __future__ import annotations

from typing import Callable, Literal

import torch.nn.functional as F
from torch import Tensor

__all__ = ["TaskKind", "task_loss", "task_metrics", "trimmed_loss"]

TaskKind = Literal["classification", "regression"]


def task_loss(kind: TaskKind, output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy (logits vs integer labels) or mean squared error."""
    if kind == "classification":
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def trimmed_loss(kind: TaskKind, trim: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The task's loss without the `trim` fraction of examples whose loss is largest (rounded down;
    at least one example kept): a support-set loss robust to noisy labels, whose gradient ignores
    the examples the model finds least plausible.

    Example:
        >>> import torch
        >>> logits, labels = torch.tensor([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 0, 0, 1])
        >>> float(trimmed_loss("classification", 0.25)(logits, labels)) < float(task_loss("classification", logits, labels))
        True
    """
    if not 0 <= trim < 1:
        raise ValueError(f"trim must be a fraction in [0, 1), got {trim!r}")

    def loss(output: Tensor, target: Tensor) -> Tensor:
        if kind == "classification":
            each = F.cross_entropy(output, target, reduction="none")
        else:
            each = F.mse_loss(output, target, reduction="none").flatten(1).mean(1)
        keep = max(1, len(each) - int(trim * len(each)))
        return each.sort().values[:keep].mean()

    return loss


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
