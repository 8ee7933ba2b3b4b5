"""Second-order MAML steps with task groups in threads (`task_workers=2`) against one group at a time.

Wall-clock tasks/s on 2 threads, contenders interleaved within every repeat (the machine must be
otherwise idle: with two threads busy, a third job distorts wall time), then the peak RSS of one
step above the RSS before it, each contender in a fresh process. Conv4, Omniglot-shaped 5w1s,
15 queries per class, meta-batch 32, random images, task groups of 2 (the default) and 1.

    cd benchmarks && python task_workers.py --steps 1 5 --repeats 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from common import interleaved_rates, peak_rss_mb, random_batch, speed_row
from fastadapt import MAML
from fastadapt.nn import Conv4
from fastadapt.runtime import keep_freed_memory

CONTENDERS = {"one group at a time (task_group=2)": dict(task_group=2),
              "task_workers=2, task_group=2": dict(task_group=2, task_workers=2),
              "task_workers=2, task_group=1": dict(task_group=1, task_workers=2)}
BASELINE = "one group at a time (task_group=2)"


def memory_child(name: str, steps: int) -> None:
    """In a fresh process: peak RSS of one step above the RSS after a warm-up step; prints JSON."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, batch = Conv4.omniglot(5), random_batch(32, 5, 1, 15)
    learner = MAML(model, 0.4, steps, **CONTENDERS[name])
    learner.meta_loss(batch)[0].backward()
    model.zero_grad(set_to_none=True)
    print(json.dumps({"peak_mb": peak_rss_mb(lambda: learner.meta_loss(batch)[0].backward())[0]}))


def peak_mb(name: str, steps: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, "--steps", str(steps)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.steps[0])
    keep_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, batch = Conv4.omniglot(5), random_batch(32, 5, 1, 15)
    print("| inner steps | contender | s per task (median) | speed against one group at a time (median, min-max) "
          "| peak RSS above baseline |")
    print("| --- | --- | --- | --- | --- |")
    for steps in args.steps:
        runs = {name: (lambda learner=MAML(model, 0.4, steps, **options): learner.meta_loss(batch)[0].backward())
                for name, options in CONTENDERS.items()}
        rates = interleaved_rates(runs, len(batch), args.repeats, lambda: model.zero_grad(set_to_none=True))
        for name in rates:
            print(f"| {steps} | {name} | {speed_row(rates, name, BASELINE)} | {peak_mb(name, steps):.0f} MB |",
                  flush=True)


if __name__ == "__main__":
    main()
