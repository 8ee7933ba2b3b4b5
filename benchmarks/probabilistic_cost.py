"""What the probabilistic learners cost per outer step against MAML (Conv4, Omniglot 5w1s shapes,
meta-batch 32, one query per class as in training, one inner step): process CPU time of
`meta_loss` + `backward` on one thread, the learners interleaved in every round.

    python benchmarks/probabilistic_cost.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import interleaved_rates, random_batch, repeat_ratios
from fastadapt import MAML
from fastadapt.nn import Conv4
from fastadapt.probabilistic import BMAML, PLATIPUS, VAMPIRE

import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = random_batch(args.tasks, 5, 1, 1)
    makers = {"MAML": lambda m: MAML(m, 0.4), "VAMPIRE (2 samples)": lambda m: VAMPIRE(m, 0.4, samples=2),
              "PLATIPUS (1 sample)": lambda m: PLATIPUS(m, 0.4),
              "BMAML (3 particles)": lambda m: BMAML(m, 0.4, particles=3),
              "BMAML (5 particles)": lambda m: BMAML(m, 0.4, particles=5)}
    learners = {}
    for name, make in makers.items():
        torch.manual_seed(0)
        learners[name] = make(Conv4.omniglot(ways=5))

    def step(learner):
        def run() -> None:
            loss, _ = learner.meta_loss(batch)
            loss.backward()
            learner.zero_grad(set_to_none=True)
        return run

    rates = interleaved_rates({n: step(learner) for n, learner in learners.items()}, 1, args.repeats,
                              clock=time.process_time)
    print(f"| learner | CPU s per outer step (median of {args.repeats}) | x MAML (median, min-max) |")
    print("|---|---|---|")
    for name in learners:
        ratios = [1 / r for r in repeat_ratios(rates, name, "MAML")]
        print(f"| {name} | {statistics.median(1 / r for r in rates[name]):.2f} | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
