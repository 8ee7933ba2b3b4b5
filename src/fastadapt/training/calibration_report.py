"""The calibration part of `fastadapt report`: every classification evaluation of a run
(`evals/*.json` from `fastadapt eval`, which records the reliability diagram's bins) as a
reliability diagram and a row of a Markdown table (accuracy, ECE, MCE, adaptive ECE, NLL, Brier).

Example:
    >>> calibration_label({"run": "maml", "ways": 5, "shots": 1, "temperature": 1.5, "ensemble": 1})
    'maml 5w1s, T=1.50'
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["CalibrationResult", "read_calibration", "calibration_label", "plot_reliability", "calibration_table"]

CalibrationResult = dict[str, Any]  # one evals/*.json with reliability bins, with "run" added
_COLUMNS = ("accuracy", "ece", "mce", "adaptive_ece", "loss", "brier")


def read_calibration(run_dir: Path, run_name: str) -> list[CalibrationResult]:
    """The run's evaluations that hold reliability bins, checked; a malformed one is a ValueError naming it."""
    results = []
    for path in sorted((Path(run_dir) / "evals").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: cannot read an evaluation: {error}") from None
        if not isinstance(data, dict) or "reliability" not in data:
            continue  # a regression evaluation, or one written before calibration was measured
        bins = data["reliability"]
        metrics = data.get("metrics")
        if (not isinstance(bins, dict) or not all(isinstance(bins.get(k), list) for k in ("edges", "count", "confidence", "accuracy"))
                or not isinstance(metrics, dict) or not all(isinstance(metrics.get(k), dict) for k in _COLUMNS)):
            raise ValueError(f"{path}: a calibrated evaluation needs reliability edges, count, confidence and accuracy "
                             f"lists and metrics {', '.join(_COLUMNS)}")
        results.append({**data, "run": run_name, "file": path.name})
    return results


def calibration_label(result: CalibrationResult) -> str:
    """`run WwKs` with the dataset when it is not the run's own, the ensemble and the temperature."""
    label = f"{result['run']} {result['ways']}w{result['shots']}s"
    if result.get("dataset") and result.get("trained_on") and result["dataset"] != result["trained_on"]:
        label += f" on {result['dataset']}"
    if (result.get("ensemble") or 1) > 1:
        label += f", top-{result['ensemble']} ensemble"
    if result.get("temperature"):
        label += f", T={result['temperature']:.2f}"
    return label


def plot_reliability(results: Sequence[CalibrationResult], path: Path) -> bool:
    """Reliability diagrams, one panel per evaluation: accuracy against confidence per bin (bars),
    the diagonal of perfect calibration, and the share of predictions per bin. False (nothing
    written) without results."""
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
        ax.bar(lefts, [c - a if n else 0.0 for c, a, n in zip(confidence, accuracy, bins["count"])], bottom=accuracy,
               width=width, align="edge", color="tab:red", alpha=0.3, label="gap to confidence")
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


def calibration_table(results: Sequence[CalibrationResult]) -> list[str]:
    """Markdown lines: one row per evaluation, accuracy and calibration errors in percent, NLL and Brier."""
    if not results:
        return []
    lines = ["## Calibration", "", "| evaluation | episodes | accuracy % | ECE % | MCE % | adaptive ECE % | NLL | Brier |",
             "|---|---|---|---|---|---|---|---|"]
    for result in results:
        m = result["metrics"]
        percent = [f"{100 * m[k]['mean']:.2f} +- {100 * m[k]['ci95']:.2f}" for k in ("accuracy", "ece", "mce", "adaptive_ece")]
        plain = [f"{m[k]['mean']:.4f} +- {m[k]['ci95']:.4f}" for k in ("loss", "brier")]
        lines.append(f"| {calibration_label(result)} | {result.get('episodes', '-')} | " + " | ".join(percent + plain) + " |")
    return lines
