"""Helpers shared by the benchmarks: random image task batches, interleaved timing, ratios."""

from __future__ import annotations

import ctypes
import gc
import statistics
import threading
import time
from typing import Callable

import torch

from fastadapt import TaskBatch


def random_batch(tasks: int, ways: int, shots: int, queries: int, dtype: torch.dtype = torch.float32,
                 seed: int = 0, channels: int = 1, size: int = 28) -> TaskBatch:
    """`tasks` random episodes of `channels`x`size`x`size` images (default Omniglot's 1x28x28),
    class-major labels."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    image = (channels, size, size)
    return TaskBatch(torch.rand(tasks, ways * shots, *image, generator=g, dtype=dtype), ys,
                     torch.rand(tasks, ways * queries, *image, generator=g, dtype=dtype), yq)


def interleaved_rates(runs: dict[str, Callable[[], None]], items: int, repeats: int,
                      before_each: Callable[[], None] = lambda: None,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """items/s of each run, alternating the runs within every repeat (after one warm-up each).
    `clock=time.process_time` counts this process's CPU time (robust to a shared machine on one thread)."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        before_each()
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            before_each()
            start = clock()
            fn()
            rates[name].append(items / (clock() - start))
    return rates


def speed_row(rates: dict[str, list[float]], name: str, baseline: str) -> str:
    """`median seconds per item | median speed against baseline (min-max)` as Markdown cells."""
    ratios = repeat_ratios(rates, name, baseline)
    return (f"{statistics.median(1 / r for r in rates[name]):.2f} | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f})")


def repeat_ratios(rates: dict[str, list[float]], candidate: str, baseline: str) -> list[float]:
    """candidate / baseline rate within each interleaved repeat."""
    return [c / b for c, b in zip(rates[candidate], rates[baseline])]


def report(rates: dict[str, list[float]], unit: str, candidate: str, baseline: str) -> None:
    """Prints median (min, max) per run and the per-repeat ratio candidate / baseline."""
    width = max(len(name) for name in rates)
    for name, values in rates.items():
        print(f"{name:>{width}}: {statistics.median(values):7.1f} {unit}/s (min {min(values):.1f}, max {max(values):.1f})")
    ratios = repeat_ratios(rates, candidate, baseline)
    print(f"{candidate} / {baseline}, per interleaved repeat: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


def rss_mb() -> float:
    """This process's resident set size (VmRSS), MB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def peak_rss_mb(step: Callable[[], None]) -> tuple[float, float]:
    """Peak RSS during `step()` above the RSS before it (sampled every ~1 ms, after `gc` and
    `malloc_trim`), and the step's seconds. Call it in a fresh process after one warm-up step."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = peak = rss_mb()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return max(peak, rss_mb()) - baseline, seconds
