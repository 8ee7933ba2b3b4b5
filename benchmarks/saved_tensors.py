"""Bytes autograd keeps for the backward of one task group's second-order support phase.

The support phase's graph is alive while the group's query passes run, so it adds to their peak
memory. This counts every distinct storage saved for backward (`saved_tensors_hooks`) during one
second-order MAML step on one group, leaving out the query passes, and lists the largest by shape
and the line that saved them. Conv4, Omniglot-shaped 5w1s, random images; deterministic (no timing).

    cd benchmarks && python saved_tensors.py --steps 1 5 --group 2
"""

from __future__ import annotations

import argparse
import collections
import traceback
from typing import Iterator

import torch

import fastadapt.functional.task_batched as task_batched
from common import random_batch
from fastadapt import MAML
from fastadapt.nn import Conv4


def saved_by_support_phase(steps: int, group: int) -> collections.Counter:
    """Bytes saved for backward by the support phase, keyed by (graph, dtype, shape, source line)."""
    torch.manual_seed(0)
    model = Conv4.omniglot(5)
    batch = random_batch(group, 5, 1, 15)
    learner = MAML(model, 0.4, steps, task_group=group)
    counting, seen, tally = [True], set(), collections.Counter()
    query_passes = task_batched._query_passes

    def uncounted(*args, **kwargs):
        counting[0] = False
        try:
            return query_passes(*args, **kwargs)
        finally:
            counting[0] = True

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if counting[0] and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            stack = traceback.extract_stack()[:-1]
            ours = [f for f in stack if "fastadapt" in f.filename or "torch/nn" in f.filename]
            line = f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}" if ours else "?"
            graph = "inner gradient" if any("autograd/__init__" in f.filename for f in stack) else "forward"
            tally[(graph, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), line)] += storage.nbytes()
        return tensor

    task_batched._query_passes = uncounted
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            learner.meta_loss(batch)[0].backward()
    finally:
        task_batched._query_passes = query_passes
    return tally


def rows(tally: collections.Counter, top: int) -> Iterator[str]:
    """Markdown table rows of the `top` largest entries, in KB."""
    for (graph, dtype, shape, line), size in tally.most_common(top):
        yield f"| {size / 2**10:.0f} | {graph} | {dtype} {list(shape)} | {line} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--group", type=int, default=2, help="tasks per group (MAML's task_group)")
    parser.add_argument("--top", type=int, default=12, help="largest entries listed per setting")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for steps in args.steps:
        tally = saved_by_support_phase(steps, args.group)
        print(f"\n{steps} inner step(s), group of {args.group}: {sum(tally.values()) / 2**20:.2f} MB saved\n")
        print("| KB | graph | tensor | saved at |\n| --- | --- | --- | --- |")
        print("\n".join(rows(tally, args.top)))


if __name__ == "__main__":
    main()
