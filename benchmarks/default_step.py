"""Whole-process timing of the default second-order MAML step, for A/B runs of two checkouts.

Conv4, Omniglot 5w1s shapes (random images, 15 queries per class), meta-batch 32, 2 threads:
`BATCHES` meta-batches at `STEPS` inner steps; prints tasks/s. Run it under two checkouts in
alternation and compare whole-process wall time and peak memory (`/usr/bin/time -v`):

    PYTHONPATH=A/src python benchmarks/default_step.py 1 4
    PYTHONPATH=B/src python benchmarks/default_step.py 1 4
"""

from __future__ import annotations

import sys
import time

import torch

from fastadapt import MAML, TaskBatch
from fastadapt.nn import Conv4


def main(steps: int, batches: int) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    learner = MAML(Conv4.omniglot(5), 0.4, steps)
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.rand(32, 5, 1, 28, 28, generator=g), torch.arange(5).expand(32, -1).contiguous(),
                      torch.rand(32, 75, 1, 28, 28, generator=g),
                      torch.arange(5).repeat_interleave(15).expand(32, -1).contiguous())
    start = time.perf_counter()
    for _ in range(batches):
        learner.zero_grad(set_to_none=True)
        learner.meta_loss(batch)[0].backward()
    print(f"{32 * batches / (time.perf_counter() - start):.2f} tasks/s")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
