"""Calibration of classifiers: how well the probabilities a learner states match how often it is right.

All functions take predicted probabilities `probs` `(N, C)` (rows sum to 1) and integer labels
`(N,)`. The top-label binned errors use 15 equal-width bins by default, each the interval
`(lower, upper]` (Guo et al. 2017's convention; the first bin also holds 0):

- `expected_calibration_error` (ECE): the count-weighted mean over bins of |accuracy - confidence|;
- `maximum_calibration_error` (MCE): the largest such gap over non-empty bins;
- `adaptive_calibration_error`: ECE over equal-mass bins (each holds N/bins of the predictions in
  order of confidence), which does not leave the high-confidence bins to a few points;
- `brier_scores` / `nll_scores`: per prediction, `sum_c (p_c - 1[c = y])^2` and `-log p_y`
  (proper scoring rules; their means are the Brier score and the NLL);
- `reliability_bins`: the data of a reliability diagram.

Example:
    >>> import torch
    >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    >>> round(float(expected_calibration_error(probs, torch.tensor([0, 1]))), 3)
    0.35
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BINS", "ReliabilityBins", "top_label", "bin_index", "reliability_bins", "expected_calibration_error",
           "maximum_calibration_error", "adaptive_calibration_error", "brier_scores", "nll_scores", "errors_from_bins"]

BINS = 15


def top_label(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each prediction's confidence (its largest probability) and whether its argmax is the label (0/1).

    Example:
        >>> top_label(torch.tensor([[0.3, 0.7]]), torch.tensor([1]))
        (tensor([0.7000]), tensor([1.]))
    """
    _check(probs, labels)
    confidence, predicted = probs.max(-1)
    return confidence, (predicted == labels).to(probs.dtype)


def bin_index(confidence: Tensor, bins: int = BINS) -> Tensor:
    """The equal-width bin `(k/bins, (k+1)/bins]` each confidence falls in (0 in bin 0).

    Example:
        >>> bin_index(torch.tensor([0.0, 0.2, 0.21, 1.0]), bins=5).tolist()
        [0, 0, 1, 4]
    """
    inner = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype, device=confidence.device)[1:-1]
    return torch.bucketize(confidence, inner, right=False)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per equal-width bin: how many predictions, the sum of their confidences and of their
    correctness (0/1). Bins add up: pooled predictions are the sum of their parts' bins."""

    count: Tensor
    confidence_sum: Tensor
    correct_sum: Tensor

    @property
    def bins(self) -> int:
        return self.count.shape[-1]

    def as_dict(self) -> dict[str, list[float]]:
        """The reliability diagram's data: bin edges, counts, mean confidence and accuracy (None in empty bins)."""
        filled = self.count > 0
        mean = lambda s: [float(v) if f else None for v, f in zip(s / self.count.clamp(min=1), filled)]  # noqa: E731
        return {"edges": torch.linspace(0, 1, self.bins + 1).tolist(), "count": [int(c) for c in self.count],
                "confidence": mean(self.confidence_sum), "accuracy": mean(self.correct_sum)}


def reliability_bins(probs: Tensor, labels: Tensor, bins: int = BINS) -> ReliabilityBins:
    """The top-label reliability data of `probs` (see `ReliabilityBins`).

    Example:
        >>> reliability_bins(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([0, 1]), bins=2).count
        tensor([0., 2.])
    """
    confidence, correct = top_label(probs, labels)
    index = bin_index(confidence, bins)
    zeros = torch.zeros(bins, dtype=probs.dtype, device=probs.device)
    return ReliabilityBins(zeros.index_add(0, index, torch.ones_like(confidence)), zeros.index_add(0, index, confidence),
                           zeros.index_add(0, index, correct))


def errors_from_bins(count: Tensor, confidence_sum: Tensor, correct_sum: Tensor) -> tuple[Tensor, Tensor]:
    """ECE and MCE from bin totals `(..., bins)` (leading dimensions: e.g. bootstrap resamples).

    Example:
        >>> errors_from_bins(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.8]), torch.tensor([0.0, 2.0]))
        (tensor(0.3000), tensor(0.5000))
    """
    gap = (correct_sum - confidence_sum).abs() / count.clamp(min=1)
    ece = (gap * count).sum(-1) / count.sum(-1)
    mce = torch.where(count > 0, gap, torch.zeros_like(gap)).amax(-1)
    return ece, mce


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = BINS) -> Tensor:
    """Top-label ECE over `bins` equal-width bins (see the module docstring)."""
    r = reliability_bins(probs, labels, bins)
    return errors_from_bins(r.count, r.confidence_sum, r.correct_sum)[0]


def maximum_calibration_error(probs: Tensor, labels: Tensor, bins: int = BINS) -> Tensor:
    """Top-label MCE: the largest |accuracy - confidence| over non-empty equal-width bins.

    Example:
        >>> float(maximum_calibration_error(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([0, 1]), bins=2))
        0.25
    """
    r = reliability_bins(probs, labels, bins)
    return errors_from_bins(r.count, r.confidence_sum, r.correct_sum)[1]


def adaptive_calibration_error(probs: Tensor, labels: Tensor, bins: int = BINS) -> Tensor:
    """Top-label ECE over equal-mass bins: the predictions in order of confidence split into `bins`
    runs of (nearly) equal size, as `numpy.array_split` does.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
        >>> round(float(adaptive_calibration_error(probs, torch.tensor([0, 0, 1, 0]), bins=2)), 3)
        0.113
    """
    confidence, correct = top_label(probs, labels)
    order = confidence.argsort()
    return sorted_adaptive_error(confidence[order], correct[order], bins)


def sorted_adaptive_error(confidence: Tensor, correct: Tensor, bins: int = BINS) -> Tensor:
    """`adaptive_calibration_error` of predictions already sorted by confidence."""
    n = confidence.numel()
    bins = min(bins, n)
    edges = _array_split_edges(n, bins)
    conf = torch.cat([confidence.new_zeros(1), confidence.cumsum(0)])
    right = torch.cat([correct.new_zeros(1), correct.cumsum(0)])
    at = torch.tensor(edges, device=confidence.device)
    gap = ((right[at[1:]] - right[at[:-1]]) - (conf[at[1:]] - conf[at[:-1]])).abs()
    return gap.sum() / n


def _array_split_edges(n: int, bins: int) -> list[int]:
    """Where `numpy.array_split(range(n), bins)` cuts: the first n % bins runs one longer."""
    size, extra = divmod(n, bins)
    edges = [0]
    for k in range(bins):
        edges.append(edges[-1] + size + (1 if k < extra else 0))
    return edges


def brier_scores(probs: Tensor, labels: Tensor) -> Tensor:
    """Each prediction's multi-class Brier score, `sum_c (p_c - 1[c = y])^2` (0 best, 2 worst).

    Example:
        >>> brier_scores(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([0, 1]))
        tensor([0.5000, 2.0000])
    """
    _check(probs, labels)
    target = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return ((probs - target) ** 2).sum(-1)


def nll_scores(probs: Tensor, labels: Tensor) -> Tensor:
    """Each prediction's negative log-likelihood `-log p_y` (`p_y` floored at the dtype's smallest
    normal number: a confident mistake costs a large, finite amount).

    Example:
        >>> nll_scores(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))
        tensor([0.6931])
    """
    _check(probs, labels)
    tiny = torch.finfo(probs.dtype).tiny
    return -probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1).clamp(min=tiny).log()


def _check(probs: Tensor, labels: Tensor) -> None:
    if probs.dim() < 2 or labels.shape != probs.shape[:-1]:
        raise ValueError(f"probs must be (..., classes) and labels the leading shape; got probs {tuple(probs.shape)} "
                         f"and labels {tuple(labels.shape)}")
