"""fastadapt's default MAML path against a plain per-task loop with torch.autograd.grad.

Same Conv4 (Omniglot shape), same initial weights, same random tasks, same thread count,
alternating repetitions in one process. Prints tasks/s (median, min-max) and the ratio, and the
float64 agreement of the two meta-gradients (the comparison is void unless they agree).

    python benchmarks/engine_vs_loop.py --queries 15 --steps 1 --repeats 5
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fastadapt import MAML
from fastadapt.nn import Conv4
from common import interleaved_rates, random_batch, report


def plain_loop_meta_grad(model, batch, inner_lr, steps):
    """What learn2learn-style code does: per task, autograd.grad(create_graph=True), then backward."""
    params = dict(model.named_parameters())
    for t in range(len(batch)):
        p = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, p, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {n: w - inner_lr * g for (n, w), g in zip(p.items(), grads)}
        (F.cross_entropy(functional_call(model, p, (batch.query_x[t],)), batch.query_y[t]) / len(batch)).backward()
    return [w.grad for w in model.parameters()]


def engine_meta_grad(learner, batch):
    learner.meta_loss(batch)[0].backward()
    return [w.grad for w in learner.model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model64 = Conv4.omniglot(args.ways).double()
    batch64 = random_batch(4, args.ways, args.shots, args.queries, torch.float64)
    reference = plain_loop_meta_grad(model64, batch64, 0.4, args.steps)
    reference = [g.clone() for g in reference]
    model64.zero_grad()
    engine = engine_meta_grad(MAML(model64, 0.4, args.steps), batch64)
    agreement = max(float((e - r).norm() / r.norm()) for e, r in zip(engine, reference))

    torch.manual_seed(0)
    model = Conv4.omniglot(args.ways)
    learner = MAML(model, 0.4, args.steps)
    batch = random_batch(args.meta_batch, args.ways, args.shots, args.queries, torch.float32)
    runs = {"plain loop": lambda: plain_loop_meta_grad(model, batch, 0.4, args.steps),
            "fastadapt": lambda: engine_meta_grad(learner, batch)}
    rates = interleaved_rates(runs, args.meta_batch, args.repeats, lambda: model.zero_grad(set_to_none=True))
    print(f"Conv4 {args.ways}w{args.shots}s, {args.queries} queries, {args.steps} inner step(s), meta-batch "
          f"{args.meta_batch}, second order, {args.threads} threads, torch {torch.__version__}")
    print(f"float64 meta-gradient agreement (max relative difference): {agreement:.2e}")
    report(rates, "tasks", "fastadapt", "plain loop")

if __name__ == "__main__":
    main()
