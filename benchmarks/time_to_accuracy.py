"""Wall time to a test accuracy on real Omniglot 5w1s: fastadapt against learn2learn's own MAML recipe.

Both train on episodes of the same 1200 training characters (fastadapt's sampler: learn2learn's
`get_tasksets` needs torchvision's downloader, which has no network here) and are evaluated every
`--eval-every` iterations on the same fixed test episodes; the clock stops during evaluation.
- fastadapt: `fastadapt run`'s MAML defaults (Conv4 with max-pool, inner lr 0.4, 1 step in
  training and 3 at test, Adam 3e-3, meta-batch 32, 1 query per class), fp32 or `--precision bf16`.
- learn2learn: examples/vision/maml_omniglot.py as published (OmniglotCNN with strided
  convolutions, `l2l.algorithms.MAML(lr=0.5)`, Adam 3e-3, meta-batch 32, 1 adaptation step,
  1 query per class, clone/adapt/backward per task). Runs in the peer venv.

    python benchmarks/time_to_accuracy.py --contender fastadapt --data-root ../shared/data \\
        --target 0.97 --budget-minutes 30 [--precision bf16] [--threads 2]

Prints one line per evaluation: iteration, training seconds, test accuracy +- 95% CI.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
import torch.nn.functional as F

from fastadapt import MAML, TaskBatch
from fastadapt.data import EpisodeSampler
from fastadapt.data.omniglot import omniglot_splits
from fastadapt.nn import Conv4
from fastadapt.runtime import keep_freed_memory
from fastadapt.training.evaluate import mean_ci95

Step = Callable[[TaskBatch], None]
Accuracy = Callable[[TaskBatch], torch.Tensor]


def fastadapt_contender(precision: str) -> tuple[torch.nn.Module, Step, Accuracy]:
    learner = MAML(Conv4.omniglot(5), inner_lr=0.4, inner_steps=1, precision=precision)

    def step(batch: TaskBatch) -> None:
        learner.meta_loss(batch)[0].backward()

    def accuracy(batch: TaskBatch) -> torch.Tensor:
        return learner.task_metrics(batch, inner_steps=3)["accuracy"]

    return learner, step, accuracy


def learn2learn_contender() -> tuple[torch.nn.Module, Step, Accuracy]:
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(l2l.vision.models.OmniglotCNN(5), lr=0.5, first_order=False)

    def adapted_logits(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
        learner = maml.clone()
        learner.adapt(F.cross_entropy(learner(sx), sy))
        return learner(qx)

    def step(batch: TaskBatch) -> None:
        for t in range(len(batch)):
            loss = F.cross_entropy(adapted_logits(batch.support_x[t], batch.support_y[t], batch.query_x[t]), batch.query_y[t])
            (loss / len(batch)).backward()  # the recipe scales the summed gradients by 1 / meta-batch

    def accuracy(batch: TaskBatch) -> torch.Tensor:
        return torch.stack([(adapted_logits(batch.support_x[t], batch.support_y[t], batch.query_x[t]).argmax(-1)
                             == batch.query_y[t]).float().mean() for t in range(len(batch))]).detach()

    return maml, step, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contender", choices=("fastadapt", "learn2learn"), required=True)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fastadapt only")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="training time before giving up")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-episodes", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(args.seed)
    splits = omniglot_splits(args.data_root)
    train = EpisodeSampler(splits["train"], 5, 1, 1, seed=args.seed)
    test = EpisodeSampler(splits["test"], 5, 1, 15, seed=1)
    test_batches = [test.task_batch(i, 50) for i in range(0, args.eval_episodes, 50)]
    model, step, accuracy = (learn2learn_contender() if args.contender == "learn2learn"
                             else fastadapt_contender(args.precision))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    label = args.contender + (f" {args.precision}" if args.contender == "fastadapt" else "")
    print(f"{label}: Omniglot 5w1s, target {args.target:.2%}, budget {args.budget_minutes} min, "
          f"{args.threads} threads, test on {args.eval_episodes} fixed episodes (15 queries per class)", flush=True)
    history, trained, iteration = [], 0.0, 0
    while trained < 60 * args.budget_minutes:
        start = time.perf_counter()
        for _ in range(args.eval_every):
            optimizer.zero_grad(set_to_none=True)
            step(train.task_batch(iteration * 32, 32))
            optimizer.step()
            iteration += 1
        trained += time.perf_counter() - start
        estimate = mean_ci95(torch.cat([accuracy(b) for b in test_batches]))
        history.append({"iteration": iteration, "seconds": trained, "accuracy": estimate.mean, "ci95": estimate.ci95})
        print(f"iteration {iteration:6d}  trained {trained:7.1f} s  test accuracy {estimate.mean:.4f} +- "
              f"{estimate.ci95:.4f}", flush=True)
        if estimate.mean >= args.target:
            print(f"{label}: reached {args.target:.2%} after {trained:.1f} s of training ({iteration} iterations)")
            break
    else:
        print(f"{label}: did not reach {args.target:.2%} within {args.budget_minutes} min "
              f"(best {max(h['accuracy'] for h in history):.4f})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"contender": label, "args": vars(args), "history": history}, out, indent=1)


if __name__ == "__main__":
    main()
