"""The robustness part of `fastadapt report`: every run's `robustness/*.json` (written by
`fastadapt robustness`) as curves (accuracy against the attack radius, the label-noise rate and the
corruption severity) and a Markdown table.

Example:
    >>> row = {"condition": "attack", "eps": 0.1, "metrics": {"accuracy": {"mean": 0.5, "ci95": 0.01}}}
    >>> condition_label(row)
    'attack eps 0.1 on query'
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["RobustnessResult", "read_robustness", "condition_label", "plot_robustness", "robustness_table"]

RobustnessResult = dict[str, Any]  # one robustness/*.json, with "run" (the run's name) added
_CONDITIONS = ("clean", "attack", "label_noise", "corruption")
_NUMBER, _TEXT = (int, float), str
# each condition's own keys and their types
_CONDITION_KEYS: dict[str, dict[str, Any]] = {
    "clean": {}, "attack": {"eps": _NUMBER}, "label_noise": {"kind": _TEXT, "rate": _NUMBER},
    "corruption": {"name": _TEXT, "severity": int, "where": _TEXT}}
_KEYS_TEXT = "attack: eps; label_noise: kind, rate; corruption: name, severity, where"


def _valid_condition(row: Any) -> bool:
    if not isinstance(row, dict) or row.get("condition") not in _CONDITIONS:
        return False
    accuracy = (row.get("metrics") or {}).get("accuracy") if isinstance(row.get("metrics"), dict) else None
    if not isinstance(accuracy, dict) or not all(isinstance(accuracy.get(k), _NUMBER) for k in ("mean", "ci95")):
        return False
    return all(isinstance(row.get(key), kind) and not isinstance(row.get(key), bool)
               for key, kind in _CONDITION_KEYS[row["condition"]].items())


def read_robustness(run_dir: Path, run_name: str) -> list[RobustnessResult]:
    """The run's robustness results, checked; a malformed file is a ValueError naming it."""
    results = []
    for path in sorted((Path(run_dir) / "robustness").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: cannot read a robustness result: {error}") from None
        conditions = data.get("conditions") if isinstance(data, dict) else None
        if not isinstance(conditions, list) or not conditions:
            raise ValueError(f"{path}: a robustness result needs a non-empty 'conditions' list")
        for row in conditions:
            if not _valid_condition(row):
                raise ValueError(f"{path}: a condition needs 'condition' ({', '.join(_CONDITIONS)}), its own keys "
                                 f"({_KEYS_TEXT}) and metrics.accuracy mean and ci95, got {row!r}")
        results.append({**data, "run": run_name, "file": path.name})
    return results


def condition_label(row: dict[str, Any]) -> str:
    """A condition in words: 'clean', 'attack eps 0.1 on support' (files without a target: query), 'label noise pair 0.4', 'rotation 3 (query)'."""
    kind = row["condition"]
    if kind == "attack":
        return f"attack eps {row['eps']:g} on {row.get('target', 'query')}"
    if kind == "label_noise":
        return f"label noise {row['kind']} {row['rate']:g}"
    if kind == "corruption":
        return f"{row['name']} {row['severity']} ({row['where']})"
    return "clean"


def _accuracy(row: dict[str, Any]) -> tuple[float, float]:
    accuracy = row["metrics"]["accuracy"]
    return 100 * accuracy["mean"], 100 * accuracy["ci95"]


def _curves(results: Sequence[RobustnessResult]) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """Per panel (attack, label noise, corruption), per line: points (x, accuracy %, CI %), each line
    starting at the clean number (x = 0). Corruptions: the mean over corruption names per severity."""
    panels: dict[str, dict[str, list[tuple[float, float, float]]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        clean = next((r for r in result["conditions"] if r["condition"] == "clean"), None)
        attack = result.get("attack") or {}
        setting = (f"{result['run']} {result.get('dataset', '')} {result.get('ways')}w{result.get('shots')}s"
                   f"{result.get('queries')}q {result.get('inner_steps') or 0}st [{Path(result['file']).stem[-8:]}]")
        by_severity: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
        for row in result["conditions"]:
            mean, ci = _accuracy(row)
            if row["condition"] == "attack":
                line = f"{setting} {attack.get('kind', '')} {attack.get('norm', '')} {row.get('target', 'query')}"
                panels["attack"][line].append((row["eps"], mean, ci))
            elif row["condition"] == "label_noise":
                panels["label_noise"][f"{setting} {row['kind']}"].append((row["rate"], mean, ci))
            elif row["condition"] == "corruption":
                by_severity[(row["where"], row["severity"])].append((mean, ci))
        for (where, severity), points in by_severity.items():
            panels["corruption"][f"{setting} {where}"].append(
                (severity, sum(m for m, _ in points) / len(points), sum(c for _, c in points) / len(points)))
        if clean is not None:
            for panel in panels.values():
                for name, points in panel.items():
                    if name.startswith(setting) and not any(x == 0 for x, _, _ in points):
                        points.append((0.0, *_accuracy(clean)))
    return panels


def plot_robustness(results: Sequence[RobustnessResult], path: Path) -> bool:
    """Writes the curves to `path` (PNG, atomically); False (nothing written) without results."""
    panels = _curves(results)
    if not panels:
        return False
    from matplotlib.figure import Figure

    from ..io import atomic_path

    titles = {"attack": ("accuracy under attack (on query, support or both)", "eps"),
              "label_noise": ("support-set label noise", "noise rate"),
              "corruption": ("corruptions (mean over the names at each severity)", "severity")}
    shown = [k for k in titles if k in panels]
    fig = Figure(figsize=(5.5 * len(shown), 4.2), layout="constrained")
    axes: list[Axes] = list(fig.subplots(1, len(shown), squeeze=False)[0])
    for ax, key in zip(axes, shown):
        title, xlabel = titles[key]
        for index, (name, points) in enumerate(sorted(panels[key].items())):
            points = sorted(points)
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=3, markersize=4, color=f"C{index % 10}", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return True


def robustness_table(results: Sequence[RobustnessResult]) -> list[str]:
    """Markdown lines: one row per run, setting and condition (accuracy, mean +- 95% CI, in percent)."""
    if not results:
        return []
    lines = ["## Robustness", "", "| run | dataset | ways | shots | episodes | condition | accuracy (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        for row in result["conditions"]:
            mean, ci = _accuracy(row)
            lines.append(f"| {result['run']} | {result.get('dataset', '-')} | {result.get('ways', '-')} | "
                         f"{result.get('shots', '-')} | {result.get('episodes', '-')} | {condition_label(row)} | "
                         f"{mean:.2f} +- {ci:.2f} |")
    return lines
