"""The calibration table of docs/results.md from evaluated runs: for each `RUN[:LABEL]`, its
`evals/*-calibrated.json` (before and after temperature scaling, the same predictions) and its
`ood/mnist-*.json`, as Markdown rows.

    python benchmarks/calibration_table.py runs/calib/maml-s0:MAML runs/calib/protonet-s0:ProtoNet
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cell(metrics: dict, key: str, scale: float = 100.0, digits: int = 2) -> str:
    return f"{scale * metrics[key]['mean']:.{digits}f} +- {scale * metrics[key]['ci95']:.{digits}f}"


def rows(run: Path, label: str) -> list[str]:
    lines = []
    for path in sorted((run / "evals").glob("*-calibrated.json")):
        result = json.loads(path.read_text())
        members = len(result.get("members", []))
        name = label + (f" + {members} more runs (deep ensemble)" if members else "")
        oods = [json.loads(p.read_text()) for p in sorted((run / "ood").glob("mnist-*ep*.json"))]
        ood = next((o for o in oods if o.get("members", []) == result.get("members", []) and o["episodes"] >= 500), None)
        auroc = f"{ood['auroc']:.3f} +- {ood['ci95']:.3f}" if ood else "-"
        for when, metrics, t in (("before", result["uncalibrated"], "1"), ("after", result["metrics"],
                                                                             f"{result['temperature']:.2f}")):
            lines.append(f"| {name} | {when} (T = {t}) | {cell(metrics, 'accuracy')} | {cell(metrics, 'ece')} | "
                         f"{cell(metrics, 'adaptive_ece')} | {cell(metrics, 'loss', 1, 4)} | {cell(metrics, 'brier', 1, 4)} | "
                         f"{auroc if when == 'before' else ''} |")
    return lines


def main() -> None:
    print("| learner | temperature scaling | accuracy % | ECE % | adaptive ECE % | NLL | Brier | AUROC vs MNIST |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in sys.argv[1:]:
        path, _, label = spec.partition(":")
        for line in rows(Path(path), label or Path(path).name):
            print(line)


if __name__ == "__main__":
    main()
