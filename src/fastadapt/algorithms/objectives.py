"""What a task asks for: classification (cross-entropy, accuracy), regression (mean squared error)
or regression with a Gaussian output (`gaussian`: the model outputs a mean and a raw scale per
target, `gaussian_parameters` turns them into mean and standard deviation; the loss is the Gaussian
negative log-likelihood, the metrics add the mean's squared error as `mse`)."""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TaskKind", "task_loss", "task_metrics", "trimmed_loss", "gaussian_parameters", "predictive_mean", "MIN_STD"]

TaskKind = Literal["classification", "regression", "gaussian"]
MIN_STD = 1e-3  # the smallest standard deviation a Gaussian output states


def gaussian_parameters(output: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation `(..., targets)` of a Gaussian output `(..., 2 * targets)`: the
    first half the means, the second raw scales, `std = softplus(raw) + MIN_STD`.

    Example:
        >>> import torch
        >>> mean, std = gaussian_parameters(torch.tensor([[1.0, 0.0]]))
        >>> float(mean), round(float(std), 4)
        (1.0, 0.6941)
    """
    mean, raw = output.chunk(2, dim=-1)
    return mean, F.softplus(raw) + MIN_STD


def task_loss(kind: TaskKind, output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy (logits vs integer labels), mean squared error, or the mean Gaussian
    negative log-likelihood (`gaussian`)."""
    if kind == "classification":
        return F.cross_entropy(output, target)
    if kind == "gaussian":
        return _gaussian_nll(output, target).mean()
    return F.mse_loss(output, target)


def _gaussian_nll(output: Tensor, target: Tensor) -> Tensor:
    """Each target's Gaussian negative log-likelihood (no data-dependent checks: vmap-safe)."""
    mean, std = gaussian_parameters(output)
    return 0.5 * math.log(2 * math.pi) + std.log() + 0.5 * ((target - mean) / std) ** 2


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
    """Detached per-task metrics: `loss` (`loss_fn`, default the task's), plus `accuracy` for
    classification and `mse` (of the mean) for a Gaussian output.

    Example:
        >>> import torch
        >>> task_metrics("classification", torch.tensor([[2.0, 0.0]]), torch.tensor([0]))["accuracy"]
        tensor(1.)
    """
    output = output.detach()
    metrics = {"loss": task_loss(kind, output, target) if loss_fn is None else loss_fn(output, target).detach()}
    if kind == "classification":
        metrics["accuracy"] = (output.argmax(-1) == target).float().mean()
    elif kind == "gaussian":
        metrics["mse"] = F.mse_loss(gaussian_parameters(output)[0], target)
    return metrics


def predictive_mean(kind: TaskKind, samples: Tensor, dim: int) -> Tensor:
    """The predictive distribution of several samples of outputs (over `dim`) as one output: the
    log of the mean class probabilities (classification), the mean (regression), or the Gaussian
    with the mixture's mean and variance (a Gaussian output, moment-matched).

    Example:
        >>> import torch
        >>> predictive_mean("classification", torch.tensor([[0.0, 0.0], [0.0, 0.0]]), 0).exp()
        tensor([0.5000, 0.5000])
    """
    if kind == "classification":
        return torch.logsumexp(torch.log_softmax(samples, -1), dim) - math.log(samples.shape[dim])
    if kind == "gaussian":
        means, stds = gaussian_parameters(samples)
        mean = means.mean(dim)
        variance = (stds ** 2 + means ** 2).mean(dim) - mean ** 2
        excess = (variance.clamp(min=0).sqrt() - MIN_STD).clamp(min=1e-6)
        return torch.cat([mean, excess + torch.log(-torch.expm1(-excess))], -1)  # the inverse of softplus
    return samples.mean(dim)


def check_kind(kind: str) -> TaskKind:
    if kind not in ("classification", "regression", "gaussian"):
        raise ValueError(f"task must be 'classification', 'regression' or 'gaussian', got {kind!r}")
    return kind  # type: ignore[return-value]
