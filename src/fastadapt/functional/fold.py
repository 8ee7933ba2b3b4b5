"""Folding tasks that share weights into one large batch, with BatchNorm statistics kept per task.

A batch `(T, B, ...)` of T tasks run through a shared-weight network as one `(T*B, ...)` batch is
the same function as T separate calls, except for BatchNorm, which would mix the tasks'
statistics. Inside `per_task_batch_norm(T)` every batch-statistics `F.batch_norm` call normalises
each of the T groups with its own statistics, so the folded call equals the per-task loop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["per_task_batch_norm", "can_fold", "fold_call"]

# Layers that treat every example on its own, or (BatchNorm without running statistics) are
# handled per task by `per_task_batch_norm`.
_PER_EXAMPLE = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh,
    nn.Sigmoid, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
    nn.Dropout, nn.LayerNorm, nn.GroupNorm,
)


def can_fold(model: nn.Module) -> bool:
    """True if folding tasks into one batch is exact for `model` (known per-example layers only)."""
    for m in model.modules():
        if list(m.children()):
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.track_running_stats:
                return False
        elif not isinstance(m, _PER_EXAMPLE):
            return False
    return True


class per_task_batch_norm(TorchFunctionMode):
    """Within this context, batch-statistics BatchNorm on `(T*B, C, ...)` normalises per task.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2, track_running_stats=False)
        >>> x = torch.randn(3, 4, 2)
        >>> with per_task_batch_norm(3):
        ...     folded = bn(x.flatten(0, 1))
        >>> torch.allclose(folded, torch.cat([bn(t) for t in x]), atol=1e-6)
        True
    """

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.tasks = tasks

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _grouped_batch_norm(self.tasks, *args, **kwargs)
        return func(*args, **kwargs)


def _grouped_batch_norm(
    tasks: int,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    if running_mean is not None and not training:  # running statistics: per example already
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if running_mean is not None:
        raise RuntimeError("per_task_batch_norm cannot update running statistics; use a loop over tasks")
    x = input.unflatten(0, (tasks, -1))
    dims = [1, *range(3, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    shape = [1, 1, -1] + [1] * (x.dim() - 3)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.flatten(0, 1)


def fold_call(model: nn.Module, x: Tensor) -> Tensor:
    """`model` on each task of `x` `(T, B, ...)` in one folded call: `(T, B, ...)` out."""
    with per_task_batch_norm(x.shape[0]):
        out = model(x.flatten(0, 1))
    return out.unflatten(0, x.shape[:2])
