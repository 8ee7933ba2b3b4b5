"""A user's own nn.Sequential Conv4 against fastadapt.nn.Conv4: the same fast path, found by structure.

Second-order MAML, Omniglot 5w1s shapes (random images), 15 queries per class, meta-batch 32, at 1
and 5 inner steps. Speed: both models interleaved in one process (one warm-up each, then
`--repeats` rounds), tasks/s by process CPU time and by wall time, and the per-round ratio user /
fastadapt. Memory: each (model, steps) in a fresh process, one warm-up step, then the peak RSS of
one step above the RSS before it (`common.peak_rss_mb`), `--memory-repeats` processes each,
interleaved.

    python benchmarks/any_model_fast_path.py [--steps 1 5] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from common import interleaved_rates, peak_rss_mb, random_batch, repeat_ratios
from fastadapt import MAML
from fastadapt.nn import Conv4

MODELS = ("fastadapt Conv4", "user nn.Sequential")


def users_conv4(ways: int = 5, hidden: int = 64) -> nn.Sequential:
    """Conv4 as a peer library or a user writes it: four conv-BatchNorm-ReLU-pool blocks, then a head."""
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Conv2d(1 if i == 0 else hidden, hidden, 3, padding=1),
                   nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden, ways))


def model(name: str) -> nn.Module:
    """The model called `name`, with the same weights for both (seed 0)."""
    torch.manual_seed(0)
    reference = Conv4.omniglot(5)
    if name == MODELS[0]:
        return reference
    user = users_conv4()
    weights = [p.detach() for p in reference.parameters()]
    with torch.no_grad():
        for p, w in zip(user.parameters(), weights, strict=True):
            p.copy_(w)
    return user


def child(name: str, steps: int) -> None:
    """Prints `{"peak_mb": ..., "seconds": ...}` for one meta-batch of `name` at `steps` inner steps."""
    learner = MAML(model(name), 0.4, steps)
    batch = random_batch(32, 5, 1, 15)

    def step() -> None:
        learner.meta_loss(batch)[0].backward()
    step()
    learner.zero_grad(set_to_none=True)
    peak, seconds = peak_rss_mb(step)
    print(json.dumps({"peak_mb": peak, "seconds": seconds, "plan": str(learner.plan(batch))}))


def speed(steps: int, repeats: int) -> None:
    batch = random_batch(32, 5, 1, 15)
    learners = {name: MAML(model(name), 0.4, steps) for name in MODELS}
    for name, learner in learners.items():
        print(f"  plan of {name}: {learner.plan(batch)}")
    runs = {name: (lambda learner=learner: learner.meta_loss(batch)[0].backward()) for name, learner in learners.items()}
    for clock, label in ((time.process_time, "CPU time"), (time.perf_counter, "wall time")):
        rates = interleaved_rates(runs, len(batch), repeats, clock=clock)
        ratios = repeat_ratios(rates, MODELS[1], MODELS[0])
        cells = " | ".join(f"{statistics.median(rates[name]):.2f}" for name in MODELS)
        print(f"| {steps} | {label} | {cells} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


def memory(steps: int, repeats: int, threads: int) -> None:
    peaks: dict[str, list[float]] = {name: [] for name in MODELS}
    for _ in range(repeats):
        for name in MODELS:
            out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--child", name, str(steps)],
                                 check=True, capture_output=True, text=True).stdout
            peaks[name].append(json.loads(out.splitlines()[-1])["peak_mb"])
    ratios = [u / f for f, u in zip(peaks[MODELS[0]], peaks[MODELS[1]])]
    cells = " | ".join(f"{statistics.median(peaks[name]):.1f} ({min(peaks[name]):.1f}-{max(peaks[name]):.1f})"
                       for name in MODELS)
    print(f"| {steps} | {cells} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    print(f"Second-order MAML, Omniglot 5w1s shapes, meta-batch 32, {args.threads} threads\n")
    print(f"| inner steps | clock | {MODELS[0]} tasks/s | {MODELS[1]} tasks/s | user / fastadapt (min-max) |")
    print("| --- | --- | --- | --- | --- |")
    for steps in args.steps:
        speed(steps, args.repeats)
    print(f"\n| inner steps | {MODELS[0]} peak MB | {MODELS[1]} peak MB | user / fastadapt (min-max) |")
    print("| --- | --- | --- | --- |")
    for steps in args.steps:
        memory(steps, args.memory_repeats, args.threads)


if __name__ == "__main__":
    main()
