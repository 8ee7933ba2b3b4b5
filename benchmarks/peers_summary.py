"""One summary row per setting from the JSON that `peers.py --json` wrote: fastadapt's speed
against learn2learn (by default, in bf16, with two task workers, both), against the fastest peer,
peak memory against learn2learn's, and GFLOP/s against the run's fp32 matmul ceiling. Ratios are
medians of the per-repeat ratios (min-max in brackets), as in peers.py's own tables.

    python benchmarks/peers_summary.py benchmarks/results/peers-all-session20.json
"""

from __future__ import annotations

import argparse
import json
import statistics

from common import repeat_ratios
from peers import BASELINE, span

PEERS = ("learn2learn", "higher", "torchopt", "plain loop")
VARIANTS = ("fastadapt", "fastadapt bf16", "fastadapt 2 workers", "fastadapt 2 workers bf16")


def ratio(rates: dict[str, list[float]], candidate: str, baseline: str) -> str:
    """`median (min-max)x` of candidate / baseline per repeat, or `-` when either did not run."""
    if candidate not in rates or baseline not in rates:
        return "-"
    return span(repeat_ratios(rates, candidate, baseline), ".2f", "x")


def memory(peak_mb: dict[str, float], candidate: str) -> str:
    """`fastadapt MB / learn2learn MB = ratio`, or `-` without memory numbers."""
    if candidate not in peak_mb or BASELINE not in peak_mb:
        return "-"
    return f"{peak_mb[candidate]:.0f} / {peak_mb[BASELINE]:.0f} = {peak_mb[candidate] / peak_mb[BASELINE]:.2f}x"


def row(name: str, result: dict, ceiling: float) -> str:
    """The summary row of one setting.

    Example:
        >>> result = {"rates": {"fastadapt": [2.0, 3.0], "learn2learn": [1.0, 1.0]},
        ...           "peak_mb": {"fastadapt": 40.0, "learn2learn": 100.0}, "flops_per_task": 1e9}
        >>> row("s", result, 10.0).split(" | ")[:3]
        ['| s', '2.50x (2.00-3.00)', '-']
    """
    rates, peak_mb = result["rates"], result["peak_mb"]
    peers = [p for p in PEERS if p in rates]
    fastest = max(peers, key=lambda p: statistics.median(rates[p]))
    gflops = {name: result["flops_per_task"] * statistics.median(rates[name]) / 1e9 for name in (VARIANTS[0], fastest)}
    cells = [ratio(rates, variant, BASELINE) for variant in VARIANTS]
    cells += [f"{ratio(rates, 'fastadapt', fastest)} ({fastest})", memory(peak_mb, "fastadapt"),
              memory(peak_mb, "fastadapt 2 workers")]
    cells += [f"{gflops[n]:.0f} ({100 * gflops[n] / ceiling:.0f}%)" for n in (VARIANTS[0], fastest)]
    return "| " + " | ".join([name, *cells]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="a file written by peers.py --json")
    args = parser.parse_args()
    with open(args.json) as source:
        run = json.load(source)
    ceiling = run["matmul_gflops"]["fp32"]
    print("| setting | fastadapt / learn2learn | bf16 / learn2learn | 2 workers / learn2learn "
          "| 2 workers bf16 / learn2learn | fastadapt / fastest peer | peak MB fastadapt / learn2learn "
          "| peak MB 2 workers / learn2learn | fastadapt GFLOP/s (% of fp32 matmul) | fastest peer's |")
    print("| --- " * 10 + "|")
    for name, result in run["results"].items():
        print(row(name, result, ceiling))
    print(f"\nfp32 matmul ceiling {ceiling:.0f} GFLOP/s, bf16 {run['matmul_gflops']['bf16']:.0f} GFLOP/s; "
          f"{run['threads']} threads; {run['machine']}.")


if __name__ == "__main__":
    main()
