"""Calibration over many test episodes, with 95% intervals.

Per-prediction scores (accuracy, NLL, Brier, CRPS, interval coverage) are averaged within each
episode; their mean over episodes gets 1.96 standard errors, as every other metric of fastadapt.
The binned errors (ECE, MCE, adaptive ECE, quantile calibration error) are not averages of
per-episode values (an episode's 75 predictions in 15 bins would bias them upwards): they pool
every prediction of every episode, and their interval is 1.96 bootstrap standard errors over
episodes (`resamples` resamples of the episodes with replacement, from a fixed seed).

Example:
    >>> import torch
    >>> probs = torch.softmax(torch.randn(40, 10, 5, generator=torch.Generator().manual_seed(0)), -1)
    >>> summary = classification_summary(probs, torch.zeros(40, 10, dtype=torch.long), resamples=50)
    >>> sorted(summary.estimates)
    ['accuracy', 'adaptive_ece', 'brier', 'ece', 'loss', 'mce']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .metrics import BINS, bin_index, brier_scores, errors_from_bins, nll_scores, reliability_bins, sorted_adaptive_error, top_label
from .regression import (COVERAGE_LEVELS, LEVELS, gaussian_crps, gaussian_nll, interval_coverage,
                         probability_integral_transform, quantile_calibration_error)

__all__ = ["Summary", "classification_summary", "regression_summary", "RESAMPLES"]

RESAMPLES = 1000


@dataclass(frozen=True)
class Summary:
    """`estimates`: name -> (value, half-width of its 95% interval); `extra`: the reliability
    diagram's bins (classification) or the PIT histogram (regression)."""

    estimates: dict[str, tuple[float, float]]
    episodes: int
    extra: dict[str, Any] = field(default_factory=dict)


def _mean_ci(per_episode: Tensor) -> tuple[float, float]:
    n = per_episode.numel()
    return float(per_episode.mean()), 1.96 * float(per_episode.std(unbiased=True)) / math.sqrt(n)


def _resample_weights(episodes: int, resamples: int, seed: int) -> Tensor:
    """`(resamples, episodes)`: how often each episode is drawn in each bootstrap resample."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, episodes, (resamples, episodes), generator=generator)
    return torch.zeros(resamples, episodes, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, episodes, dtype=torch.float64))


def _check_episodes(episodes: int) -> None:
    if episodes < 2:
        raise ValueError(f"a confidence interval needs at least 2 episodes, got {episodes}")


def classification_summary(probs: Tensor, labels: Tensor, bins: int = BINS, resamples: int = RESAMPLES,
                           seed: int = 0) -> Summary:
    """Accuracy, NLL (`loss`), Brier, ECE, MCE and adaptive ECE of predictive probabilities `probs`
    `(episodes, queries, classes)` against `labels` `(episodes, queries)`, and the pooled
    reliability diagram's bins (`extra["reliability"]`)."""
    probs, labels = probs.double(), labels.long()
    episodes, queries = labels.shape
    _check_episodes(episodes)
    confidence, correct = top_label(probs, labels)
    estimates = {"accuracy": _mean_ci(correct.mean(1)), "loss": _mean_ci(nll_scores(probs, labels).mean(1)),
                 "brier": _mean_ci(brier_scores(probs, labels).mean(1))}
    # per-episode bin totals: a resample's totals are a weighted sum of them
    index = bin_index(confidence, bins)
    per_bin = lambda values: torch.zeros(episodes, bins, dtype=torch.float64).scatter_add_(1, index, values)  # noqa: E731
    count, conf_sum, correct_sum = per_bin(torch.ones_like(confidence)), per_bin(confidence), per_bin(correct)
    weights = _resample_weights(episodes, resamples, seed)
    ece, mce = errors_from_bins(count.sum(0), conf_sum.sum(0), correct_sum.sum(0))
    boot_ece, boot_mce = errors_from_bins(weights @ count, weights @ conf_sum, weights @ correct_sum)
    estimates["ece"] = (float(ece), 1.96 * float(boot_ece.std(unbiased=True)))
    estimates["mce"] = (float(mce), 1.96 * float(boot_mce.std(unbiased=True)))
    estimates["adaptive_ece"] = _pooled_adaptive(confidence, correct, weights, bins)
    reliability = reliability_bins(probs.reshape(-1, probs.shape[-1]), labels.reshape(-1), bins)
    return Summary(estimates, episodes, {"reliability": reliability.as_dict()})


def _pooled_adaptive(confidence: Tensor, correct: Tensor, weights: Tensor, bins: int) -> tuple[float, float]:
    """Adaptive ECE of all predictions, and 1.96 bootstrap standard errors: a resample's sorted
    predictions are the sorted whole with each episode's predictions repeated as often as drawn."""
    flat_conf, flat_correct = confidence.reshape(-1), correct.reshape(-1)
    order = flat_conf.argsort(stable=True)
    sorted_conf, sorted_correct = flat_conf[order], flat_correct[order]
    episode_of = torch.arange(confidence.shape[0]).repeat_interleave(confidence.shape[1])[order]
    value = float(sorted_adaptive_error(sorted_conf, sorted_correct, bins))
    resampled = [float(sorted_adaptive_error(sorted_conf.repeat_interleave(repeats), sorted_correct.repeat_interleave(repeats), bins))
                 for repeats in weights.long()[:, episode_of]]
    return value, 1.96 * float(torch.tensor(resampled).std(unbiased=True))


def regression_summary(means: Tensor, stds: Tensor, target: Tensor, resamples: int = RESAMPLES, seed: int = 0) -> Summary:
    """NLL (`loss`), MSE of the predictive mean, CRPS, interval coverage at 50/90/95% (`picp50`,
    ...) and the quantile calibration error of Gaussian (mixture) predictions `means`, `stds`
    `(episodes, queries, components)` against `target` `(episodes, queries)`; `extra["pit"]`:
    the histogram of PIT values in 20 bins (flat when calibrated)."""
    means, stds, target = means.double(), stds.double(), target.double()
    episodes = target.shape[0]
    _check_episodes(episodes)
    pit = probability_integral_transform(means, stds, target)
    estimates = {"loss": _mean_ci(gaussian_nll(means, stds, target).mean(1)),
                 "mse": _mean_ci(((means.mean(-1) - target) ** 2).mean(1)),
                 "crps": _mean_ci(gaussian_crps(means, stds, target).mean(1))}
    for level in COVERAGE_LEVELS:
        estimates[f"picp{round(level * 100)}"] = _mean_ci(interval_coverage(pit, level).mean(1))
    weights = _resample_weights(episodes, resamples, seed)
    below = torch.stack([(pit <= p).double().mean(1) for p in LEVELS], 1)  # (episodes, levels)
    boot = ((weights @ below) / weights.sum(1, keepdim=True) - torch.tensor(LEVELS, dtype=torch.float64)).abs().mean(1)
    estimates["quantile_ce"] = (float(quantile_calibration_error(pit.reshape(-1))), 1.96 * float(boot.std(unbiased=True)))
    histogram = torch.histc(pit.reshape(-1).float(), bins=20, min=0.0, max=1.0)
    return Summary(estimates, episodes, {"pit_histogram": [int(c) for c in histogram]})
