"""`fastadapt run` with and without `--task-workers 2`, on short real Omniglot runs: training time,
test time, test accuracy, and whether the logged training rows equal the `--threads 1` run's.

For each algorithm, four runs one after the other (run nothing else meanwhile): `--threads 1`,
`--threads 1 --task-workers 2`, `--threads 2` (the default path) and `--threads 2 --task-workers 2`.
Ratios are against `--threads 2`, measured in the same invocation. Needs Omniglot under
$FASTADAPT_DATA (or ../shared/data).

    python benchmarks/task_workers_runs.py [--algos maml++ imaml] [--out runs-dir]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# The run defaults of each algorithm, shortened: iterations, and 100 test episodes.
ITERATIONS = {"maml++": 40, "imaml": 100, "maml": 40}
VARIANTS = {"threads 1": ["--threads", "1"], "threads 1, 2 workers": ["--threads", "1", "--task-workers", "2"],
            "threads 2": ["--threads", "2"], "threads 2, 2 workers": ["--threads", "2", "--task-workers", "2"]}
BASELINE, TWIN = "threads 2", "threads 1"


def run(algo: str, flags: list[str], out: Path) -> dict:
    """One `fastadapt run`; its results.json and its training rows (timings left out)."""
    command = [sys.executable, "-m", "fastadapt.cli", "run", "--algo", algo, "--dataset", "omniglot", "--ways", "5",
               "--shots", "1", "--iterations", str(ITERATIONS[algo]), "--eval-episodes", "100", *flags, "--out", str(out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((out / "results.json").read_text())
    with open(out / "metrics.csv") as f:
        rows = [{k: v for k, v in row.items() if k not in ("tasks_per_s", "elapsed_s")} for row in csv.DictReader(f)]
    return {"results": results, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", nargs="+", choices=sorted(ITERATIONS), default=["maml++", "imaml"])
    parser.add_argument("--out", type=Path, help="keep the run directories here (default: a temporary folder)")
    args = parser.parse_args()
    os.environ.setdefault("FASTADAPT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or Path(scratch)
        for algo in args.algos:
            done = {name: run(algo, flags, root / f"{algo}-{name.replace(', ', '-').replace(' ', '')}")
                    for name, flags in VARIANTS.items()}
            base = done[BASELINE]["results"]["train_time_s"]
            print(f"\n{algo}, {ITERATIONS[algo]} iterations, 100 test episodes\n")
            print("| run | training s | training speed against threads 2 | rest of the wall time s (data, test) "
                  "| test accuracy | training rows equal threads 1's |")
            print("| --- | --- | --- | --- | --- | --- |")
            for name, d in done.items():
                r = d["results"]
                same = "-" if name == TWIN else ("yes" if d["rows"] == done[TWIN]["rows"] else "no")
                print(f"| {name} | {r['train_time_s']:.1f} | {base / r['train_time_s']:.2f}x | "
                      f"{r['wall_time_s'] - r['train_time_s']:.1f} | {100 * r['mean']:.2f}% +- {100 * r['ci95']:.2f} | "
                      f"{same} |", flush=True)


if __name__ == "__main__":
    main()
