"""Wall time to a test accuracy on real Omniglot 5w1s: fastadapt against learn2learn's own recipes.

Both train on episodes of the same 1200 training characters (fastadapt's sampler: learn2learn's
`get_tasksets` needs torchvision's downloader, which has no network here) and are evaluated every
`--eval-every` iterations on the same fixed 5-way 1-shot test episodes; the clock stops during
evaluation.

`--algorithm maml`:
- fastadapt: `fastadapt run`'s MAML defaults (Conv4 with max-pool, inner lr 0.4, 1 step in
  training and 3 at test, Adam 3e-3, meta-batch 32, 1 query per class), fp32 or `--precision bf16`;
  `--backbone conv4-strided`: the same with stride-2 convolutions instead of max-pooling;
  `--halve-every N`: the outer learning rate halved every N iterations.
- learn2learn: examples/vision/maml_omniglot.py as published (OmniglotCNN with strided
  convolutions, `l2l.algorithms.MAML(lr=0.5)`, Adam 3e-3, meta-batch 32, 1 adaptation step,
  1 query per class, clone/adapt/backward per task). Runs in the peer venv.

`--algorithm protonet` (one episode per iteration):
- fastadapt: `fastadapt run --algo protonet`'s defaults (Conv4, 20-way 1-shot training episodes
  with 5 queries per class, Adam 1e-3).
- learn2learn: examples/vision/protonet_miniimagenet.py's recipe on Omniglot's one channel (its
  Convnet: four conv-BN-ReLU-pool blocks with BatchNorm weights drawn from U(0, 1); 30-way 1-shot
  training episodes with 15 queries per class; Adam 1e-3 halved every 20 epochs of 100
  episodes). Its computation is plain PyTorch (learn2learn supplies only the task sampling,
  replaced here), so it runs in either venv. Both are tested the same way: each episode's support
  and query images embedded together with their batch statistics (the recipe validates with
  running statistics instead; its BatchNorm keeps none here, which changes nothing in training).

    python benchmarks/time_to_accuracy.py --algorithm maml --contender fastadapt --data-root ../shared/data \\
        --target 0.97 --budget-minutes 30 [--precision bf16] [--threads 2]

Prints one line per evaluation: iteration, training seconds (wall, or with `--clock cpu` the
process's CPU seconds), test accuracy +- 95% CI.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastadapt import MAML, ProtoNet, TaskBatch
from fastadapt.data import EpisodeSampler
from fastadapt.data.omniglot import omniglot_splits
from fastadapt.nn import Conv4
from fastadapt.runtime import keep_freed_memory
from fastadapt.training.evaluate import mean_ci95

Step = Callable[[TaskBatch], None]
Accuracy = Callable[[TaskBatch], torch.Tensor]


@dataclass
class Recipe:
    """One contender's training: its model, step and test accuracy, outer learning rate, training
    episodes (ways, queries per class, tasks per iteration) and learning-rate halving period."""

    model: nn.Module
    step: Step
    accuracy: Accuracy
    lr: float
    ways: int
    queries: int
    tasks: int
    halve_every: int | None = None


def fastadapt_maml(args: argparse.Namespace) -> Recipe:
    pooling = "stride" if args.backbone == "conv4-strided" else "max"
    learner = MAML(Conv4.omniglot(5, pooling=pooling), inner_lr=0.4, inner_steps=1, precision=args.precision)

    def step(batch: TaskBatch) -> None:
        learner.meta_loss(batch)[0].backward()

    def accuracy(batch: TaskBatch) -> torch.Tensor:
        return learner.task_metrics(batch, inner_steps=3)["accuracy"]

    return Recipe(learner, step, accuracy, lr=3e-3, ways=5, queries=1, tasks=32, halve_every=args.halve_every)


def learn2learn_maml() -> Recipe:
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

    return Recipe(maml, step, accuracy, lr=3e-3, ways=5, queries=1, tasks=32)


def fastadapt_protonet(args: argparse.Namespace) -> Recipe:
    net = ProtoNet(Conv4.omniglot(ways=None), precision=args.precision)

    def step(batch: TaskBatch) -> None:
        net.meta_loss(batch)[0].backward()

    def accuracy(batch: TaskBatch) -> torch.Tensor:
        return net.task_metrics(batch)["accuracy"]

    return Recipe(net, step, accuracy, lr=1e-3, ways=20, queries=5, tasks=1)


def learn2learn_protonet() -> Recipe:
    def block(cin: int, cout: int) -> nn.Sequential:
        norm = nn.BatchNorm2d(cout, track_running_stats=False)  # batch statistics in tests too, as fastadapt's
        nn.init.uniform_(norm.weight)
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), norm, nn.ReLU(), nn.MaxPool2d(2))

    encoder = nn.Sequential(block(1, 64), block(64, 64), block(64, 64), block(64, 64), nn.Flatten())

    def logits(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
        embedded = encoder(torch.cat([sx, qx]))
        support, query = embedded[: len(sx)], embedded[len(sx):]
        ways = int(sy.max()) + 1
        prototypes = torch.zeros(ways, support.shape[1]).index_add_(0, sy, support) / torch.bincount(sy)[:, None]
        return -((query[:, None] - prototypes[None]) ** 2).sum(-1)

    def step(batch: TaskBatch) -> None:
        for t in range(len(batch)):
            F.cross_entropy(logits(batch.support_x[t], batch.support_y[t], batch.query_x[t]), batch.query_y[t]).backward()

    def accuracy(batch: TaskBatch) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([(logits(batch.support_x[t], batch.support_y[t], batch.query_x[t]).argmax(-1)
                                 == batch.query_y[t]).float().mean() for t in range(len(batch))])

    return Recipe(encoder, step, accuracy, lr=1e-3, ways=30, queries=15, tasks=1, halve_every=2000)


RECIPES: dict[tuple[str, str], Callable[[argparse.Namespace], Recipe]] = {
    ("maml", "fastadapt"): fastadapt_maml,
    ("maml", "learn2learn"): lambda args: learn2learn_maml(),
    ("protonet", "fastadapt"): fastadapt_protonet,
    ("protonet", "learn2learn"): lambda args: learn2learn_protonet(),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", choices=("maml", "protonet"), default="maml")
    parser.add_argument("--contender", choices=("fastadapt", "learn2learn"), required=True)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fastadapt only")
    parser.add_argument("--backbone", choices=("conv4", "conv4-strided"), default="conv4",
                        help="fastadapt MAML only: max-pooling Conv4, or stride-2 convolutions (learn2learn's "
                        "OmniglotCNN strides too, and averages the last 2 x 2 maps where ours flattens them)")
    parser.add_argument("--halve-every", type=_positive_int, metavar="N",
                        help="fastadapt MAML only: halve the outer learning rate every N iterations (the config's "
                        "schedule: step, schedule_step: N, schedule_gamma: 0.5); default constant")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="training time before giving up")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-episodes", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the process's CPU time, for runs on a machine other jobs share (use --threads 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error(f"--clock cpu sums the CPU time of all threads (idle ones spin too): use --threads 1, "
                     f"got --threads {args.threads}")
    if (args.backbone != "conv4" or args.halve_every) and (args.algorithm, args.contender) != ("maml", "fastadapt"):
        parser.error(f"--backbone {args.backbone} / --halve-every {args.halve_every} apply to --algorithm maml "
                     f"--contender fastadapt, not --algorithm {args.algorithm} --contender {args.contender}")
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(args.seed)
    splits = omniglot_splits(args.data_root)
    recipe = RECIPES[args.algorithm, args.contender](args)
    train = EpisodeSampler(splits["train"], recipe.ways, 1, recipe.queries, seed=args.seed)
    test = EpisodeSampler(splits["test"], 5, 1, 15, seed=1)
    test_batches = [test.task_batch(i, 50) for i in range(0, args.eval_episodes, 50)]
    optimizer = torch.optim.Adam(recipe.model.parameters(), lr=recipe.lr)
    schedule = (torch.optim.lr_scheduler.StepLR(optimizer, recipe.halve_every, gamma=0.5)
                if recipe.halve_every else None)
    label = f"{args.algorithm} " + args.contender + (f" {args.precision}" if args.contender == "fastadapt" else "")
    label += " conv4-strided" if args.backbone == "conv4-strided" else ""
    label += f" lr halved every {args.halve_every}" if args.halve_every else ""
    print(f"{label}: Omniglot 5w1s, target {args.target:.2%}, budget {args.budget_minutes} min, "
          f"{args.threads} threads, {args.clock} clock, test on {args.eval_episodes} fixed episodes (15 queries per class)", flush=True)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    history, trained, iteration = [], 0.0, 0
    while trained < 60 * args.budget_minutes:
        start = clock()
        for _ in range(args.eval_every):
            optimizer.zero_grad(set_to_none=True)
            recipe.step(train.task_batch(iteration * recipe.tasks, recipe.tasks))
            optimizer.step()
            if schedule is not None:
                schedule.step()
            iteration += 1
        trained += clock() - start
        estimate = mean_ci95(torch.cat([recipe.accuracy(b) for b in test_batches]))
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
