"""CPU seconds per iMAML step: all tasks' inner problems and CG solves at once against task by task.

iMAML as `fastadapt run --algo imaml` trains it (5 inner SGD steps, 5 CG steps, damping 22,
meta-batch 8, one query per class) and as its recipe does (16 inner steps, meta-batch 32), Conv4,
Omniglot-shaped random images. Process CPU time on one thread, contenders interleaved within
every repeat, so the ratios hold also on a machine other jobs share.

    cd benchmarks && python imaml_paths_cpu.py --shots 1 5 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import torch

from common import interleaved_rates, random_batch, speed_row
from fastadapt.algorithms import IMAML
from fastadapt.nn import Conv4
from fastadapt.runtime import keep_freed_memory

SETTINGS = {"run defaults": (5, 8), "recipe": (16, 32)}  # (inner steps, meta-batch)


def learner(model: torch.nn.Module, inner_steps: int, group: int | None) -> IMAML:
    """iMAML at the run's inner problem, task by task (`group=None`, the default) or in groups."""
    return IMAML(model, inner_lr=0.1, inner_steps=inner_steps, lam=2.0, cg_steps=5, cg_damping=22.0,
                 task_group=group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    print("| setting | shots | contender | CPU s per step (median) | speed against task by task (median, min-max) |")
    print("| --- | --- | --- | --- | --- |")
    for setting in args.settings:
        steps, tasks = SETTINGS[setting]
        for shots in args.shots:
            torch.manual_seed(0)
            model, batch = Conv4.omniglot(5), random_batch(tasks, 5, shots, 1)
            contenders = {"task by task": None, "groups of 8": 8}
            if tasks > 8:
                contenders[f"all {tasks} at once"] = tasks
            runs = {name: (lambda im=learner(model, steps, group): im.meta_loss(batch)[0].backward())
                    for name, group in contenders.items()}
            rates = interleaved_rates(runs, 1, args.repeats, lambda: model.zero_grad(set_to_none=True),
                                      time.process_time)
            for name in rates:
                print(f"| {setting} | {shots} | {name} | {speed_row(rates, name, 'task by task')} |", flush=True)


if __name__ == "__main__":
    main()
