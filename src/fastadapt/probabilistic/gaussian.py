"""Diagonal Gaussians over a network's weights: reparameterised samples and the KL divergence.

A distribution is a pair of parameter dicts, `mean` and `log_std`, with the model's names and
shapes. Samples are `mean + exp(log_std) * noise`, differentiable in both (the
reparameterisation trick); the noise is drawn by the caller from an explicit generator
(`probabilistic.sampling`), so a sample is a pure function of its inputs.

Example:
    >>> import torch
    >>> q = ({"w": torch.zeros(2)}, {"w": torch.zeros(2)})
    >>> float(kl_divergence(*q, {"w": torch.ones(2)}, {"w": torch.zeros(2)}))
    1.0
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..functional import Params

__all__ = ["kl_divergence", "reparameterised", "log_std_like"]


def kl_divergence(mean_q: Params, log_std_q: Params, mean_p: Params, log_std_p: Params) -> Tensor:
    """KL(q || p) of two diagonal Gaussians, summed over every entry of every tensor:
    `log s_p - log s_q + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2` per entry.
    """
    total = torch.zeros((), dtype=next(iter(mean_q.values())).dtype, device=next(iter(mean_q.values())).device)
    for name, m_q in mean_q.items():
        s_q, s_p = log_std_q[name], log_std_p[name]
        total = total + (s_p - s_q + (torch.exp(2 * s_q) + (m_q - mean_p[name]) ** 2) / (2 * torch.exp(2 * s_p)) - 0.5).sum()
    return total


def reparameterised(mean: Params, log_std: Params, noise: Params) -> Params:
    """`mean + exp(log_std) * noise` per tensor; `noise` may carry leading sample dimensions
    (then the result has them too: `(S, *shape)`).

    Example:
        >>> reparameterised({"w": torch.ones(1)}, {"w": torch.zeros(1)}, {"w": torch.full((3, 1), 2.0)})["w"].flatten()
        tensor([3., 3., 3.])
    """
    return {name: m + torch.exp(log_std[name]) * noise[name] for name, m in mean.items()}


def log_std_like(params: Params, std: float) -> dict[str, Tensor]:
    """Tensors of `log(std)` shaped as `params` (an initial log standard deviation).

    Example:
        >>> log_std_like({"w": torch.zeros(2)}, 1.0)
        {'w': tensor([0., 0.])}
    """
    if not std > 0:
        raise ValueError(f"a standard deviation must be > 0, got {std!r}")
    return {name: torch.full_like(p, math.log(std)) for name, p in params.items()}
