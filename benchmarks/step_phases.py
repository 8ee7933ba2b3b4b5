"""Where a default second-order MAML step's wall time goes: the query passes against the rest
(the task groups' support phases and the backward through them), at each thread count.

The query passes are timed by wrapping `functional.task_batched._query_passes`; "rest" is the step
minus them. The ratio of one thread's seconds to two threads' says how well each part uses the
second core. Conv4, Omniglot-shaped 5w1s, 15 queries, meta-batch 32, random images; median of
`--repeats` steps after a warm-up, thread counts alternated.

    cd benchmarks && python step_phases.py --steps 1 5 --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import fastadapt.functional.task_batched as task_batched
from common import random_batch
from fastadapt import MAML
from fastadapt.nn import Conv4

_spent = {"query": 0.0}
_query_passes = task_batched._query_passes


def _timed_query_passes(*args: Any, **kwargs: Any) -> Any:
    started = time.perf_counter()
    try:
        return _query_passes(*args, **kwargs)
    finally:
        _spent["query"] += time.perf_counter() - started


def step_seconds(maml: MAML, batch: Any) -> tuple[float, float]:
    """(whole step, query passes) in wall seconds for one meta-gradient into `.grad`."""
    _spent["query"] = 0.0
    started = time.perf_counter()
    loss, _ = maml.meta_loss(batch)
    loss.backward()
    maml.zero_grad(set_to_none=True)
    return time.perf_counter() - started, _spent["query"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    task_batched._query_passes = _timed_query_passes
    batch = random_batch(32, 5, 1, 15)
    print("| inner steps | threads | step s | query passes s | rest s |")
    print("| --- | --- | --- | --- | --- |")
    for steps in args.steps:
        torch.manual_seed(0)
        maml = MAML(Conv4.omniglot(ways=5), inner_lr=0.4, inner_steps=steps)
        step_seconds(maml, batch)  # warm-up
        times: dict[int, list[tuple[float, float]]] = {t: [] for t in args.threads}
        for _ in range(args.repeats):
            for threads in args.threads:
                torch.set_num_threads(threads)
                times[threads].append(step_seconds(maml, batch))
        for threads, rows in times.items():
            step = statistics.median(r[0] for r in rows)
            query = statistics.median(r[1] for r in rows)
            rest = statistics.median(r[0] - r[1] for r in rows)
            print(f"| {steps} | {threads} | {step:.2f} | {query:.2f} | {rest:.2f} |", flush=True)


if __name__ == "__main__":
    main()
