"""ProtoNet: the folded meta-batch (one forward, per-episode BatchNorm) against a per-episode loop.

Same Conv4 encoder, same episodes, alternating repetitions in one process; forward + backward of
the meta-loss. Prints episodes/s (median, min-max) and the ratio.

    python benchmarks/protonet_fold.py --ways 5 --shots 1 --queries 15 --meta-batch 32
"""

from __future__ import annotations

import argparse

import torch

from fastadapt import ProtoNet, TaskBatch
from fastadapt.nn import Conv4
from common import interleaved_rates, random_batch, report


def step(net: ProtoNet, batch: TaskBatch) -> None:
    net.meta_loss(batch)[0].backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = Conv4.omniglot(ways=None)
    nets = {"per-episode loop": ProtoNet(encoder, fold=False), "folded": ProtoNet(encoder, fold=True)}
    n, w, k, q = args.meta_batch, args.ways, args.shots, args.queries
    batch = random_batch(n, w, k, q)
    runs = {name: (lambda net=net: step(net, batch)) for name, net in nets.items()}
    rates = interleaved_rates(runs, n, args.repeats, lambda: encoder.zero_grad(set_to_none=True))
    print(f"ProtoNet Conv4 {w}w{k}s, {q} queries, meta-batch {n}, {torch.get_num_threads()} threads")
    report(rates, "episodes", "folded", "per-episode loop")

if __name__ == "__main__":
    main()
