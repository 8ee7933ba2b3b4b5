"""CPU seconds per MAML++ step: all tasks' support phases at once against one task at a time.

MAML++ as `fastadapt run --algo maml++` trains it (5 second-order inner steps, per-step
per-layer rates, per-step BatchNorm weights, meta-batch 16, one query per class), during the
multi-step-loss phase (5 query passes per task) and after it (1). Process CPU time on one
thread, contenders interleaved within every repeat, so the ratios hold also on a machine other
jobs share. Conv4, Omniglot-shaped random images.

    cd benchmarks && python mamlpp_paths_cpu.py --shots 1 5 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import torch

from common import interleaved_rates, random_batch, speed_row
from fastadapt.algorithms import MAMLPlusPlus
from fastadapt.nn import Conv4
from fastadapt.runtime import keep_freed_memory


def learner(model: torch.nn.Module, tasks_at_once: bool) -> MAMLPlusPlus:
    """MAML++ at the run defaults; `tasks_at_once=False` forces the per-task support phase."""
    return MAMLPlusPlus(model, inner_lr=0.1, inner_steps=5, multi_step_loss_iterations=10**9,
                        execution="loop" if tasks_at_once else "per-task")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    print("| shots | loss | contender | CPU s per step (median) | speed against per task (median, min-max) |")
    print("| --- | --- | --- | --- | --- |")
    for shots in args.shots:
        torch.manual_seed(0)
        model, batch = Conv4.omniglot(5), random_batch(16, 5, shots, 1)
        runs = {"per task": learner(model, False), "tasks at once (groups of 2)": learner(model, True)}
        for phase, iteration in (("multi-step", 0), ("last step", 10**9)):
            for maml in runs.values():
                maml.iteration.fill_(iteration)
            steps = {name: (lambda maml=maml: maml.meta_loss(batch)[0].backward()) for name, maml in runs.items()}
            # meta_loss advances the iteration counter, which only matters at the phase boundary, far away
            rates = interleaved_rates(steps, 1, args.repeats, lambda: [m.zero_grad(set_to_none=True) for m in runs.values()],
                                      time.process_time)
            for name in rates:
                print(f"| {shots} | {phase} | {name} | {speed_row(rates, name, 'per task')} |", flush=True)


if __name__ == "__main__":
    main()
