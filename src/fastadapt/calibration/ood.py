"""Telling out-of-distribution tasks from in-distribution ones by the learner's uncertainty.

A task's score is the mean predictive entropy of its queries (the entropy of the averaged class
probabilities: high where the learner, or its samples, disagree); `auroc` is the probability that an
out-of-distribution task scores higher than an in-distribution one (ties count a half), the
Mann-Whitney statistic over all pairs, with 1.96 bootstrap standard errors (both sets resampled).

Example:
    >>> import torch
    >>> auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.25, 0.4]))
    0.8333333333333334
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["predictive_entropy", "auroc", "auroc_ci95"]


def predictive_entropy(probs: Tensor) -> Tensor:
    """The entropy `-sum_c p_c log p_c` of each probability vector `(..., C)`, in nats.

    Example:
        >>> round(float(predictive_entropy(torch.tensor([0.5, 0.5]))), 4)
        0.6931
    """
    return -(probs * probs.clamp(min=torch.finfo(probs.dtype).tiny).log()).sum(-1)


def auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """P(out > in) + P(out = in) / 2 over all pairs (1: perfectly separated, 0.5: chance)."""
    if in_scores.numel() == 0 or out_scores.numel() == 0:
        raise ValueError("the AUROC needs scores of both in- and out-of-distribution tasks")
    both = torch.cat([in_scores.double().flatten(), out_scores.double().flatten()])
    ranks = _average_ranks(both)
    n_in, n_out = in_scores.numel(), out_scores.numel()
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks, ties sharing their average rank."""
    order = values.argsort(stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=values.dtype)
    unique, inverse = torch.unique(sorted_values, return_inverse=True)
    if len(unique) < len(values):  # average the ranks within each group of ties
        sums = torch.zeros(len(unique), dtype=values.dtype).index_add_(0, inverse, ranks[order])
        counts = torch.zeros(len(unique), dtype=values.dtype).index_add_(0, inverse, torch.ones_like(values))
        ranks[order] = (sums / counts)[inverse]
    return ranks


def auroc_ci95(in_scores: Tensor, out_scores: Tensor, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """`auroc` and 1.96 bootstrap standard errors (each set resampled with replacement)."""
    generator = torch.Generator().manual_seed(seed)
    value = auroc(in_scores, out_scores)
    boot = [auroc(in_scores[torch.randint(0, len(in_scores), (len(in_scores),), generator=generator)],
                  out_scores[torch.randint(0, len(out_scores), (len(out_scores),), generator=generator)])
            for _ in range(resamples)]
    return value, 1.96 * float(torch.tensor(boot).std(unbiased=True))
