"""Peak memory of one second-order MAML step against the number of inner steps.

Conv4, Omniglot 5w1s, 15 queries per class, meta-batch 32 (the peer benchmark's setting). Each
(contender, steps) runs in a fresh process: one warm-up step, `malloc_trim`, then the peak RSS
(sampled every ~1 ms) of one step above the RSS before it. Contenders: fastadapt's default path
(support phase of all tasks in one graph), fastadapt with `checkpoint_inner_loop=True` (each inner
step's graph rebuilt during the backward) and the plain per-task loop (what learn2learn does).

    python benchmarks/memory_vs_steps.py [--steps 1 5 10 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from fastadapt import MAML
from fastadapt.nn import Conv4
from common import peak_rss_mb, random_batch
from engine_vs_loop import plain_loop_meta_grad

CONTENDERS = ("fastadapt task_group=4", "fastadapt (task_group=2)", "fastadapt task_group=1", "fastadapt checkpointed",
              "plain loop")


def child(contender: str, steps: int) -> None:
    """Prints `{"peak_mb": ..., "seconds": ...}` for one step of `contender` at `steps` inner steps."""
    torch.manual_seed(0)
    model = Conv4.omniglot(5)
    batch = random_batch(32, 5, 1, 15)
    if contender == "plain loop":
        def step() -> None:
            plain_loop_meta_grad(model, batch, 0.4, steps)
    else:
        group = int(contender.split("=")[1].rstrip(")")) if "task_group=" in contender else 2
        learner = MAML(model, 0.4, steps, checkpoint_inner_loop=contender.endswith("checkpointed"), task_group=group)

        def step() -> None:
            learner.meta_loss(batch)[0].backward()
    step()
    model.zero_grad(set_to_none=True)
    peak, seconds = peak_rss_mb(step)
    print(json.dumps({"peak_mb": peak, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", nargs=2, metavar=("CONTENDER", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    print(f"Peak MB above the pre-step RSS (seconds for the step), second-order MAML, Conv4 Omniglot 5w1s, "
          f"15 queries, meta-batch 32, {args.threads} threads, torch {torch.__version__}.\n")
    print("| inner steps | " + " | ".join(CONTENDERS) + " |")
    print("| --- |" + " --- |" * len(CONTENDERS))
    for steps in args.steps:
        cells = []
        for contender in CONTENDERS:
            out = subprocess.run([sys.executable, __file__, "--child", contender, str(steps), "--threads",
                                  str(args.threads)], check=True, stdout=subprocess.PIPE, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            cells.append(f"{row['peak_mb']:.0f} ({row['seconds']:.1f} s)")
        print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
