"""Temperature scaling (Guo et al. 2017): one scalar T dividing every logit, fitted to minimise the
negative log-likelihood of held-out predictions. It changes confidences, never the argmax of a
single model (for samples or ensemble members, each member's logits are divided by T before their
probabilities are averaged).

Fit it on validation episodes only: a temperature fitted on the episodes it is then scored on
flatters the calibration it reports (`fastadapt calibrate` fits on the run's validation split).

Example:
    >>> import torch
    >>> logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [4.0, 0.0]])  # right half the time
    >>> round(fit_temperature(logits.unsqueeze(1), torch.tensor([0, 1, 0, 1])), 2) > 10
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["predictive_probs", "fit_temperature", "MIN_LOG_T", "MAX_LOG_T"]

MIN_LOG_T, MAX_LOG_T = math.log(0.01), math.log(100.0)


def predictive_probs(samples: Tensor, temperature: float = 1.0) -> Tensor:
    """The predictive probabilities of sampled logits `(..., S, C)`: the mean over the S samples of
    `softmax(logits / temperature)`, `(..., C)`, in float64.

    Example:
        >>> predictive_probs(torch.tensor([[[0.0, 0.0], [100.0, 0.0]]])).float()
        tensor([[0.7500, 0.2500]])
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return torch.softmax(samples.double() / temperature, -1).mean(-2)


def _nll(samples: Tensor, labels: Tensor, log_t: float) -> float:
    log_p = torch.logsumexp(torch.log_softmax(samples / math.exp(log_t), -1), -2) - math.log(samples.shape[-2])
    return float(-log_p.gather(-1, labels.unsqueeze(-1)).mean())


def fit_temperature(samples: Tensor, labels: Tensor) -> float:
    """The temperature in [0.01, 100] minimising the mean NLL of `samples` `(N, S, C)` (S logit
    samples per prediction; S = 1 for one model) against `labels` `(N,)`: a grid over log T,
    refined by golden-section search around its best point (deterministic, no optimizer state).
    """
    if samples.dim() != 3 or labels.shape != samples.shape[:1]:
        raise ValueError(f"samples must be (N, S, C) and labels (N,), got {tuple(samples.shape)} and "
                         f"{tuple(labels.shape)}")
    samples = samples.double()
    grid = torch.linspace(MIN_LOG_T, MAX_LOG_T, 93).tolist()
    values = [_nll(samples, labels, g) for g in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(samples, labels, a), _nll(samples, labels, b)
    for _ in range(40):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(samples, labels, a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(samples, labels, b)
    candidates = [(values[best], grid[best]), (fa, a), (fb, b)]
    return math.exp(min(candidates)[1])
