"""CPU seconds per second-order MAML step for task groups of 4, 2 and 1 and the checkpointed loop.

Process CPU time on one thread, contenders interleaved within every repeat, so the ratios hold
also on a machine other jobs share (wall-clock rates do not). Conv4, Omniglot-shaped 5w1s,
15 queries per class, meta-batch 32, random images.

    cd benchmarks && python task_group_cpu.py --steps 1 5 --repeats 4
"""

from __future__ import annotations

import argparse
import time

import torch

from common import interleaved_rates, random_batch, speed_row
from fastadapt import MAML
from fastadapt.nn import Conv4
from fastadapt.runtime import keep_freed_memory


def contenders(model: torch.nn.Module, steps: int) -> dict[str, MAML]:
    """The learners compared, all on the same model."""
    runs = {f"task_group={g}": MAML(model, 0.4, steps, task_group=g) for g in (4, 2, 1)}
    runs["checkpointed (task_group=2)"] = MAML(model, 0.4, steps, checkpoint_inner_loop=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, batch = Conv4.omniglot(5), random_batch(32, 5, 1, 15)
    print("| inner steps | contender | CPU s per step (median) | speed against task_group=4 (median, min-max) |")
    print("| --- | --- | --- | --- |")
    for steps in args.steps:
        runs = {name: (lambda learner=learner: learner.meta_loss(batch)[0].backward())
                for name, learner in contenders(model, steps).items()}
        rates = interleaved_rates(runs, 1, args.repeats, lambda: model.zero_grad(set_to_none=True), time.process_time)
        for name in rates:
            print(f"| {steps} | {name} | {speed_row(rates, name, 'task_group=4')} |", flush=True)

if __name__ == "__main__":
    main()
