"""What the probabilistic learners cost per outer step against MAML: process CPU time of
`meta_loss` + `backward` on one thread, one inner step, the learners interleaved in every round.

`--model conv4`: Omniglot 5w1s shapes, meta-batch 32, one query per class (as in training);
`--model mlp`: sinusoid regression (MLP 1-40-40-1, 5 support and 5 query points, meta-batch 25).

    python benchmarks/probabilistic_cost.py --model conv4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import interleaved_rates, random_batch, repeat_ratios
from fastadapt import MAML
from fastadapt.data import SinusoidTasks
from fastadapt.nn import MLP, Conv4
from fastadapt.probabilistic import BMAML, PLATIPUS, VAMPIRE

import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=["conv4", "mlp"], default="conv4")
    parser.add_argument("--tasks", type=int, help="meta-batch (default: 32 conv4, 25 mlp)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model == "conv4":
        batch = random_batch(args.tasks or 32, 5, 1, 1)
        model, lr, task = (lambda: Conv4.omniglot(ways=5)), 0.4, "classification"
    else:
        batch = SinusoidTasks(5, 5, seed=0).task_batch(0, args.tasks or 25)
        model, lr, task = (lambda: MLP(1, [40, 40], 1)), 0.01, "regression"
    makers = {"MAML": lambda m: MAML(m, lr, task=task), "VAMPIRE (2 samples)": lambda m: VAMPIRE(m, lr, samples=2, task=task),
              "PLATIPUS (1 sample)": lambda m: PLATIPUS(m, lr, task=task),
              "BMAML (3 particles)": lambda m: BMAML(m, lr, particles=3, task=task),
              "BMAML (5 particles)": lambda m: BMAML(m, lr, particles=5, task=task)}
    learners = {}
    for name, make in makers.items():
        torch.manual_seed(0)
        learners[name] = make(model())

    def step(learner):
        def run() -> None:
            loss, _ = learner.meta_loss(batch)
            loss.backward()
            learner.zero_grad(set_to_none=True)
        return run

    rates = interleaved_rates({n: step(learner) for n, learner in learners.items()}, 1, args.repeats,
                              clock=time.process_time)
    print(f"| learner | CPU ms per outer step (median of {args.repeats}) | x MAML (median, min-max) |")
    print("|---|---|---|")
    for name in learners:
        ratios = [1 / r for r in repeat_ratios(rates, name, "MAML")]
        print(f"| {name} | {1000 * statistics.median(1 / r for r in rates[name]):.1f} | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
