"""Calibration: whether a learner's stated confidence matches how often it is right.

- `metrics`: ECE, MCE, adaptive ECE, Brier, NLL, reliability-diagram data (classification);
- `regression`: NLL, interval coverage, quantile calibration error and CRPS of Gaussian (mixture)
  predictions;
- `temperature`: temperature scaling, fitted on validation episodes;
- `summary`: all of them over many test episodes with 95% intervals.
"""

from .metrics import (BINS, ReliabilityBins, adaptive_calibration_error, brier_scores, expected_calibration_error,
                      maximum_calibration_error, nll_scores, reliability_bins)
from .regression import gaussian_crps, gaussian_nll, interval_coverage, probability_integral_transform, quantile_calibration_error
from .summary import Summary, classification_summary, regression_summary
from .temperature import fit_temperature, predictive_probs

__all__ = ["BINS", "ReliabilityBins", "adaptive_calibration_error", "brier_scores", "expected_calibration_error",
           "maximum_calibration_error", "nll_scores", "reliability_bins", "gaussian_crps", "gaussian_nll",
           "interval_coverage", "probability_integral_transform", "quantile_calibration_error", "Summary",
           "classification_summary", "regression_summary", "fit_temperature", "predictive_probs"]
