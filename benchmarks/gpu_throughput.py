"""Second-order MAML and ProtoNet on a CUDA GPU: which execution path is fastest there.

Conv4, Omniglot-shaped 5w1s (15 queries per class), meta-batch 32, random images. MAML contenders:
task groups (`--groups`: 1 task by task, 32 all tasks in one grouped-convolution graph, auto the
learner's default), each with the first conv block as the learner runs it (`reordered`: the CPU
fast path, functional.fused_block, which the learner leaves to cuDNN's layers on a GPU) and layer
by layer (`unfused()`), in fp32 and bf16 autocast; interleaved within every repeat, each
timing `--steps-per-timing` meta-steps ended by a device sync. Peak GPU memory per contender from
torch.cuda.max_memory_allocated. ProtoNet: episodes/s at 5w1s and 20w5s, one episode per step.
iMAML (`--imaml`): its run defaults (5 inner steps, meta-batch 8) and recipe (16 steps, meta-batch
32), 5 CG steps, task by task (the default) against the whole meta-batch solved at once.

    python benchmarks/gpu_throughput.py --inner-steps 1 5 --repeats 3
    python benchmarks/gpu_throughput.py --groups 32 --paths layers --precisions fp32 --profile
    python benchmarks/gpu_throughput.py --inner-steps --imaml
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from typing import Callable

import torch

from common import interleaved_rates, random_batch
from fastadapt import IMAML, MAML, ProtoNet
from fastadapt.functional.fused_block import unfused
from fastadapt.nn import Conv4


def _maml_runs(inner_steps: int, batch, per_timing: int, args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    runs: dict[str, Callable[[], None]] = {}
    for reorder in [path == "reordered" for path in args.paths]:  # "reordered": as the learner decides
        for group in args.groups:
            for precision in args.precisions:
                torch.manual_seed(0)
                layered = contextlib.nullcontext if reorder else unfused
                with layered():
                    learner = MAML(Conv4.omniglot(5), 0.4, inner_steps, precision=precision,
                                   task_group=None if group == "auto" else int(group)).cuda()
                name = f"group {group}, {'reordered' if reorder else 'layers'}, {precision}"
                runs[name] = _timed(learner, batch, per_timing, layered)
    return runs


def _timed(learner: torch.nn.Module, batch, per_timing: int, context) -> Callable[[], None]:
    def run() -> None:
        with context():
            for _ in range(per_timing):
                learner.zero_grad(set_to_none=True)
                learner.meta_loss(batch)[0].backward()
        torch.cuda.synchronize()

    return run


def _peak_mb(run: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _print_profile(title: str, run: Callable[[], None]) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    print(f"\n{title}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8), flush=True)


def _imaml_rows(args: argparse.Namespace) -> None:
    print("| iMAML setting | contender | tasks/s (median, min-max) |")
    print("| --- | --- | --- |")
    for setting, steps, tasks in (("run defaults", 5, 8), ("recipe", 16, 32)):
        batch = random_batch(tasks, 5, 1, 1).to("cuda")
        runs = {}
        for name, group in (("task by task", None), (f"all {tasks} at once", tasks)):
            torch.manual_seed(0)
            learner = IMAML(Conv4.omniglot(5), inner_lr=0.1, inner_steps=steps, lam=2.0, cg_steps=5,
                            cg_damping=22.0, task_group=group).cuda()
            runs[name] = _timed(learner, batch, args.steps_per_timing, contextlib.nullcontext)
        rates = interleaved_rates(runs, tasks * args.steps_per_timing, args.repeats)
        for name, r in rates.items():
            print(f"| {setting} | {name} | {statistics.median(r):.0f} ({min(r):.0f}-{max(r):.0f}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inner-steps", type=int, nargs="*", default=[1, 5], help="MAML rows (none: skip MAML)")
    parser.add_argument("--imaml", action="store_true", help="also time iMAML task by task against tasks at once")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps-per-timing", type=int, default=10)
    parser.add_argument("--groups", nargs="+", default=["1", "32", "auto"], help="MAML task groups (numbers or auto)")
    parser.add_argument("--paths", nargs="+", choices=("reordered", "layers"), default=["reordered", "layers"])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cuDNN's algorithm search off")
    parser.add_argument("--profile", action="store_true",
                        help="print the top operators (CPU and CUDA time) of each contender's timing")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    batch = random_batch(32, 5, 1, 15).to("cuda")
    if args.inner_steps:
        print("| inner steps | contender | tasks/s (median, min-max) | peak GPU memory, MB |")
        print("| --- | --- | --- | --- |")
    for steps in args.inner_steps:
        runs = _maml_runs(steps, batch, args.steps_per_timing, args)
        rates = interleaved_rates(runs, 32 * args.steps_per_timing, args.repeats)
        for name, run in runs.items():
            r = rates[name]
            print(f"| {steps} | {name} | {statistics.median(r):.0f} ({min(r):.0f}-{max(r):.0f}) | "
                  f"{_peak_mb(run):.0f} |", flush=True)
        if args.profile:
            for name, run in runs.items():
                _print_profile(f"{steps} inner steps, {name}", run)
    if args.imaml:
        _imaml_rows(args)
    for ways, shots in ((5, 1), (20, 5)):
        torch.manual_seed(0)
        net = ProtoNet(Conv4.omniglot(None)).cuda()
        episode = random_batch(1, ways, shots, 15).to("cuda")
        runs = {"protonet": _timed(net, episode, 10 * args.steps_per_timing, contextlib.nullcontext)}
        rates = interleaved_rates(runs, 10 * args.steps_per_timing, args.repeats)
        r = rates["protonet"]
        print(f"ProtoNet {ways}w{shots}s: {statistics.median(r):.0f} episodes/s ({min(r):.0f}-{max(r):.0f})", flush=True)


if __name__ == "__main__":
    main()
