"""Calibration of probabilistic regression: predictions that are Gaussians, or equal-weight mixtures
of Gaussians (the samples of a Bayesian learner, an ensemble's members, SVGD particles).

A prediction is `means` and `stds` of shape `(..., M)` (M components, M = 1 for one Gaussian) for
targets of shape `(...)`. Everything is measured through the predictive CDF at the target, the
probability integral transform `u = F(y)`, which is uniform on [0, 1] for a calibrated predictor:

- `gaussian_nll`: `-log p(y)` of the mixture;
- `interval_coverage(u, level)`: how often `y` lies in the central `level` interval (PICP);
- `quantile_calibration_error(u)`: the mean over levels p = 0.05 .. 0.95 of |P(u <= p) - p|;
- `gaussian_crps`: the continuous ranked probability score, in closed form (Grimit et al. 2006).

Example:
    >>> import torch
    >>> u = probability_integral_transform(torch.zeros(3, 1), torch.ones(3, 1), torch.tensor([-1.0, 0.0, 1.0]))
    >>> [round(v, 3) for v in u.tolist()]
    [0.159, 0.5, 0.841]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LEVELS", "COVERAGE_LEVELS", "probability_integral_transform", "gaussian_nll", "interval_coverage",
           "quantile_calibration_error", "gaussian_crps"]

LEVELS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 .. 0.95
COVERAGE_LEVELS = (0.5, 0.9, 0.95)


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _normal_pdf(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)


def _check(means: Tensor, stds: Tensor, target: Tensor) -> None:
    if means.shape != stds.shape or means.shape[:-1] != target.shape:
        raise ValueError(f"means and stds must be (..., components) and target the leading shape; got means "
                         f"{tuple(means.shape)}, stds {tuple(stds.shape)}, target {tuple(target.shape)}")
    if not bool((stds > 0).all()):
        raise ValueError("stds must be > 0")


def probability_integral_transform(means: Tensor, stds: Tensor, target: Tensor) -> Tensor:
    """`F(y)`: the mixture's CDF at each target, `(...)`."""
    _check(means, stds, target)
    return _normal_cdf((target.unsqueeze(-1) - means) / stds).mean(-1)


def gaussian_nll(means: Tensor, stds: Tensor, target: Tensor) -> Tensor:
    """Each target's negative log density under the equal-weight mixture, `(...)`.

    Example:
        >>> round(float(gaussian_nll(torch.zeros(1), torch.ones(1), torch.tensor(0.0))), 4)
        0.9189
    """
    _check(means, stds, target)
    z = (target.unsqueeze(-1) - means) / stds
    log_each = -0.5 * z ** 2 - stds.log() - 0.5 * math.log(2 * math.pi)
    return -(torch.logsumexp(log_each, -1) - math.log(means.shape[-1]))


def interval_coverage(pit: Tensor, level: float) -> Tensor:
    """Whether each target lies in the predictor's central `level` interval (1.0 or 0.0), from
    its PIT value: `|u - 1/2| <= level / 2`.

    Example:
        >>> interval_coverage(torch.tensor([0.5, 0.97]), 0.9)
        tensor([1., 0.])
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return ((pit - 0.5).abs() <= level / 2).to(pit.dtype)


def quantile_calibration_error(pit: Tensor, levels: tuple[float, ...] = LEVELS) -> Tensor:
    """Mean over quantile levels p of |fraction of targets below the predicted p-quantile - p|.

    Example:
        >>> round(float(quantile_calibration_error(torch.linspace(0.0005, 0.9995, 1000))), 4)
        0.0
    """
    fractions = torch.stack([(pit <= p).to(pit.dtype).mean() for p in levels])
    return (fractions - torch.tensor(levels, dtype=pit.dtype, device=pit.device)).abs().mean()


def _a(mu: Tensor, var: Tensor) -> Tensor:
    """E|X| for X ~ N(mu, var)."""
    sigma = var.sqrt()
    return 2 * sigma * _normal_pdf(mu / sigma) + mu * (2 * _normal_cdf(mu / sigma) - 1)


def gaussian_crps(means: Tensor, stds: Tensor, target: Tensor) -> Tensor:
    """Each target's CRPS under the equal-weight Gaussian mixture, `E|X - y| - E|X - X'| / 2`
    in closed form, `(...)` (for one Gaussian `sigma (z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi))`).

    Example:
        >>> round(float(gaussian_crps(torch.zeros(1), torch.ones(1), torch.tensor(0.0))), 4)
        0.2337
    """
    _check(means, stds, target)
    var = stds ** 2
    to_target = _a(target.unsqueeze(-1) - means, var).mean(-1)
    between = _a(means.unsqueeze(-1) - means.unsqueeze(-2), var.unsqueeze(-1) + var.unsqueeze(-2)).mean((-2, -1))
    return to_target - between / 2
