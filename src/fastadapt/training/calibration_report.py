"""The calibration part of `fastadapt report`: every classification evaluation of a run
(`evals/*.json` from `fastadapt eval`, which records the reliability diagram's bins) as a
reliability diagram and a row of a Markdown table (accuracy, ECE, MCE, adaptive ECE, NLL, Brier);
every evaluation of a Gaussian-output regressor as a row of a second table (NLL, MSE, CRPS,
interval coverage) and a plot of its predictive samples on four episodes.

Example:
    >>> calibration_label({"run": "maml", "ways": 5, "shots": 1, "temperature": 1.5, "ensemble": 1})
    'maml 5w1s, T=1.50'
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["CalibrationResult", "read_calibration", "calibration_label", "plot_reliability", "calibration_table",
           "plot_bands"]

CalibrationResult = dict[str, Any]  # one evals/*.json with reliability bins, with "run" added
_COLUMNS = ("accuracy", "ece", "mce", "adaptive_ece", "loss", "brier")
_REGRESSION_COLUMNS = ("loss", "mse", "crps", "picp50", "picp90", "picp95", "quantile_ce")


def read_calibration(run_dir: Path, run_name: str) -> list[CalibrationResult]:
    """The run's evaluations that hold reliability bins, checked; a malformed one is a ValueError naming it."""
    results = []
    for path in sorted((Path(run_dir) / "evals").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: cannot read an evaluation: {error}") from None
        if not isinstance(data, dict) or not ("reliability" in data or "bands" in data):
            continue  # a point regression, or an evaluation written before calibration was measured
        metrics = data.get("metrics")
        if "bands" in data:
            if (not isinstance(metrics, dict) or not all(isinstance(metrics.get(k), dict) for k in _REGRESSION_COLUMNS)
                    or not isinstance(data["bands"], list)):
                raise ValueError(f"{path}: a Gaussian regression evaluation needs metrics {', '.join(_REGRESSION_COLUMNS)} "
                                 "and a list of bands")
            results.append({**data, "run": run_name, "file": path.name})
            continue
        bins = data["reliability"]
        if (not isinstance(bins, dict) or not all(isinstance(bins.get(k), list) for k in ("edges", "count", "confidence", "accuracy"))
                or not isinstance(metrics, dict) or not all(isinstance(metrics.get(k), dict) for k in _COLUMNS)):
            raise ValueError(f"{path}: a calibrated evaluation needs reliability edges, count, confidence and accuracy "
                             f"lists and metrics {', '.join(_COLUMNS)}")
        results.append({**data, "run": run_name, "file": path.name})
    return results


def calibration_label(result: CalibrationResult) -> str:
    """`run WwKs` with the dataset when it is not the run's own, the ensemble and the temperature."""
    label = f"{result['run']} {result['ways']}w{result['shots']}s"
    if "bands" in result:
        label = f"{result['run']} {result['shots']}-shot"
    if result.get("dataset") and result.get("trained_on") and result["dataset"] != result["trained_on"]:
        label += f" on {result['dataset']}"
    if (result.get("ensemble") or 1) > 1:
        label += f", top-{result['ensemble']} ensemble"
    if result.get("temperature"):
        label += f", T={result['temperature']:.2f}"
    return label


def plot_reliability(results: Sequence[CalibrationResult], path: Path) -> bool:
    """Reliability diagrams, one panel per classification evaluation: accuracy against confidence
    per bin (bars), the diagonal of perfect calibration, and the share of predictions per bin.
    False (nothing written) without results."""
    results = [r for r in results if "reliability" in r]
    if not results:
        return False
    from .report import _new_figure, _save

    columns = min(3, len(results))
    rows = math.ceil(len(results) / columns)
    fig = _new_figure(4.2 * columns, 4.0 * rows)
    for i, result in enumerate(results):
        ax = fig.add_subplot(rows, columns, i + 1)
        bins = result["reliability"]
        edges = bins["edges"]
        width = edges[1] - edges[0]
        lefts = edges[:-1]
        accuracy = [a if a is not None else 0.0 for a in bins["accuracy"]]
        confidence = [c if c is not None else left + width / 2 for c, left in zip(bins["confidence"], lefts)]
        ax.bar(lefts, accuracy, width=width, align="edge", color="tab:blue", edgecolor="white", label="accuracy")
        ax.bar(lefts, [abs(c - a) if n else 0.0 for c, a, n in zip(confidence, accuracy, bins["count"])],
               bottom=[min(c, a) for c, a in zip(confidence, accuracy)], width=width, align="edge", color="none",
               edgecolor="tab:red", hatch="//", linewidth=0.5, label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], color="black", linewidth=1, linestyle="--")
        total = sum(bins["count"]) or 1
        ax.step(edges, [0.0] + [n / total for n in bins["count"]], where="pre", color="tab:gray", linewidth=1,
                label="share of predictions")
        ece = result["metrics"]["ece"]
        ax.set_title(f"{calibration_label(result)}\nECE {100 * ece['mean']:.2f} +- {100 * ece['ci95']:.2f}%", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        if i == 0:
            ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)
    return True


def plot_bands(results: Sequence[CalibrationResult], path: Path) -> bool:
    """Gaussian-output regressors: one row per evaluation, one panel per episode, with the support
    points (black), the query points (grey), and every predictive sample's mean and 90% band
    (mean +- 1.645 std). False (nothing written) without such evaluations."""
    results = [r for r in results if "bands" in r]
    if not results:
        return False
    from .report import _new_figure, _save

    columns = max(len(r["bands"]) for r in results)
    fig = _new_figure(3.6 * columns, 3.0 * len(results))
    for row, result in enumerate(results):
        for column, band in enumerate(result["bands"]):
            ax = fig.add_subplot(len(results), columns, row * columns + column + 1)
            for k, (means, stds) in enumerate(zip(band["means"], band["stds"])):
                color = f"C{k % 10}"
                ax.fill_between(band["x"], [m - 1.645 * s for m, s in zip(means, stds)],
                                [m + 1.645 * s for m, s in zip(means, stds)], color=color, alpha=0.12, linewidth=0)
                ax.plot(band["x"], means, color=color, linewidth=1)
            ax.scatter(band["query_x"], band["query_y"], s=4, color="tab:gray", label="query points")
            ax.scatter(band["support_x"], band["support_y"], s=30, color="black", zorder=5, label="support points")
            if column == 0:
                ax.set_title(f"{calibration_label(result)}: {len(band['means'])} sample(s)", fontsize=9)
                ax.set_ylabel("y")
            ax.set_xlabel("x")
    _save(fig, path)
    return True


def calibration_table(results: Sequence[CalibrationResult]) -> list[str]:
    """Markdown lines: one row per classification evaluation (accuracy and calibration errors in
    percent, NLL and Brier), then one per Gaussian regression evaluation (NLL, MSE, CRPS, coverage)."""
    regression = [r for r in results if "bands" in r]
    results = [r for r in results if "reliability" in r]
    lines = _regression_table(regression)
    if not results:
        return lines
    lines = lines + ([""] if lines else []) + ["## Calibration", "", "| evaluation | episodes | accuracy % | ECE % | MCE % | adaptive ECE % | NLL | Brier |",
             "|---|---|---|---|---|---|---|---|"]
    for result in results:
        rows = [(calibration_label(result), result["metrics"])]
        if isinstance(result.get("uncalibrated"), dict):  # the same predictions before scaling
            rows.insert(0, (calibration_label({**result, "temperature": None}) + ", before scaling", result["uncalibrated"]))
        for label, m in rows:
            percent = [f"{100 * m[k]['mean']:.2f} +- {100 * m[k]['ci95']:.2f}" for k in ("accuracy", "ece", "mce", "adaptive_ece")]
            plain = [f"{m[k]['mean']:.4f} +- {m[k]['ci95']:.4f}" for k in ("loss", "brier")]
            lines.append(f"| {label} | {result.get('episodes', '-')} | " + " | ".join(percent + plain) + " |")
    return lines


def _regression_table(results: Sequence[CalibrationResult]) -> list[str]:
    if not results:
        return []
    lines = ["## Regression with uncertainty", "",
             "| evaluation | episodes | NLL | MSE | CRPS | 50% coverage | 90% coverage | 95% coverage | quantile CE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        m = result["metrics"]
        cells = [f"{m[k]['mean']:.4f} +- {m[k]['ci95']:.4f}" for k in _REGRESSION_COLUMNS]
        lines.append(f"| {calibration_label(result)} | {result.get('episodes', '-')} | " + " | ".join(cells) + " |")
    return lines
