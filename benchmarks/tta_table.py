"""Training time to each accuracy level, from the JSON files of `time_to_accuracy.py` runs.

    python benchmarks/tta_table.py benchmarks/results/tta-learn2learn-cpu.json \\
        benchmarks/results/tta-fastadapt-conv4-halve500.json --levels 0.90 0.93 0.95 0.97

Prints a Markdown table: for each level, each run's training seconds (and iteration) at its first
evaluation at or above the level, or "not in N s (best X)" with N its training time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def first_reaching(history: list[dict], level: float) -> dict | None:
    """The first evaluation with accuracy >= level, or None.

    Example:
        >>> first_reaching([{"accuracy": 0.8}, {"accuracy": 0.95}], 0.9)
        {'accuracy': 0.95}
    """
    return next((h for h in history if h["accuracy"] >= level), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="JSON files written by time_to_accuracy.py --json")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.85, 0.90, 0.93, 0.95, 0.97])
    args = parser.parse_args()
    runs = [json.loads(path.read_text()) for path in args.runs]
    print("| test accuracy reached | " + " | ".join(run["contender"] for run in runs) + " |")
    print("| --- |" + " --- |" * len(runs))
    for level in args.levels:
        cells = []
        for run in runs:
            hit = first_reaching(run["history"], level)
            if hit is None:
                best = max(h["accuracy"] for h in run["history"])
                cells.append(f"not in {run['history'][-1]['seconds']:.0f} s (best {best:.2%})")
            else:
                cells.append(f"{hit['seconds']:.0f} s (iteration {hit['iteration']})")
        print(f"| {level:.0%} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
