"""Timing helpers shared by the benchmarks: interleaved repetitions and ratio reports."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_rates(runs: dict[str, Callable[[], None]], items: int, repeats: int,
                      before_each: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """items/s of each run, alternating the runs within every repeat (after one warm-up each)."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        before_each()
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            before_each()
            start = time.perf_counter()
            fn()
            rates[name].append(items / (time.perf_counter() - start))
    return rates


def report(rates: dict[str, list[float]], unit: str, candidate: str, baseline: str) -> None:
    """Prints median (min, max) per run and the per-repeat ratio candidate / baseline."""
    width = max(len(name) for name in rates)
    for name, values in rates.items():
        print(f"{name:>{width}}: {statistics.median(values):7.1f} {unit}/s (min {min(values):.1f}, max {max(values):.1f})")
    ratios = [c / b for c, b in zip(rates[candidate], rates[baseline])]
    print(f"{candidate} / {baseline}, per interleaved repeat: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
