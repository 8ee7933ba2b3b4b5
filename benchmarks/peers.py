"""fastadapt against learn2learn 0.2.0, higher 0.2.1, TorchOpt 0.7.3 and a plain torch loop.

Identical work for every contender in one process: the same Conv4 and initial weights (each gets
a deepcopy), the same random tasks, inner lr, inner steps, meta-batch and thread count; one step
is the meta-gradient of the mean query loss into `.grad`. Repetitions alternate the contenders.
Per setting: tasks/s median (min-max), fastadapt / contender per repeat, peak RSS above baseline
(a fresh child process per contender and setting), the float64 meta-gradient agreement with
fastadapt (VOID above 1e-9) and GFLOP/s (FLOPs of one task counted on the plain loop) against a
matmul ceiling measured in the same run. Runs in the venv of benchmarks/peers/setup_venv.sh:

    benchmarks/.peer-venv/bin/python benchmarks/peers.py [--settings NAME ...] [--repeats 5] \\
        [--threads 2] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastadapt import TaskBatch
from fastadapt.nn import Conv4
from fastadapt.runtime import keep_freed_memory
from common import interleaved_rates, peak_rss_mb, random_batch, repeat_ratios
from peer_steps import MAML_CONTENDERS, PROTONET_CONTENDERS, Step

VOID_ABOVE = 1e-9
BASELINE = "learn2learn"


def is_mixed(name: str) -> bool:
    """bf16 contenders: fast by design, not exact; compared on speed only."""
    return name.endswith("bf16")
PACKAGES = ("torch", "fastadapt", "learn2learn", "higher", "torchopt")


@dataclass(frozen=True)
class Setting:
    """One benchmark configuration; `steps == 0` means ProtoNet (no inner loop)."""

    name: str
    ways: int
    shots: int
    queries: int
    meta_batch: int
    steps: int = 0
    first_order: bool = False
    inner_lr: float = 0.4
    mini_imagenet: bool = False

    @property
    def protonet(self) -> bool:
        """ProtoNet episodes rather than MAML tasks."""
        return self.steps == 0

    def describe(self) -> str:
        image = "mini-ImageNet 3x84x84, 32 filters" if self.mini_imagenet else "Omniglot 1x28x28, 64 filters"
        what = "ProtoNet" if self.protonet else (
            f"{'FO' if self.first_order else ''}MAML, {self.steps} inner step(s), inner lr {self.inner_lr}")
        return (f"{what}; Conv4 {image}; {self.ways}-way {self.shots}-shot, {self.queries} queries per class, "
                f"meta-batch {self.meta_batch}")


def all_settings() -> list[Setting]:
    """The 8 Omniglot MAML settings, mini-ImageNet MAML and two ProtoNet settings."""
    maml = [Setting(f"omniglot-{w}w1s-{s}step-{'fo' if fo else 'so'}", w, 1, q, 32, s, fo)
            for w, q in ((5, 15), (20, 5)) for s in (1, 5) for fo in (False, True)]
    return maml + [
        Setting("mini-imagenet-5w1s-5step-so", 5, 1, 15, 4, 5, False, 0.01, mini_imagenet=True),
        Setting("protonet-5w1s", 5, 1, 15, 32),
        Setting("protonet-20w5s", 20, 5, 5, 32),
    ]


def quick(setting: Setting) -> Setting:
    """The smoke-test size of a setting: meta-batch 2, 2 queries per class."""
    return replace(setting, meta_batch=2, queries=min(setting.queries, 2))


def build(setting: Setting, tasks: int, dtype: torch.dtype) -> tuple[nn.Module, TaskBatch]:
    """The seeded Conv4 (a head unless ProtoNet) and a random task batch."""
    torch.manual_seed(0)
    ways = None if setting.protonet else setting.ways
    model = Conv4.mini_imagenet(ways) if setting.mini_imagenet else Conv4.omniglot(ways)
    image = {"channels": 3, "size": 84} if setting.mini_imagenet else {}
    batch = random_batch(tasks, setting.ways, setting.shots, setting.queries, dtype, **image)
    return model.to(dtype), batch


def contender_names(setting: Setting) -> list[str]:
    """The contenders that run this setting, fastadapt first."""
    return list(PROTONET_CONTENDERS if setting.protonet else MAML_CONTENDERS)


def make_step(setting: Setting, name: str, model: nn.Module) -> Step:
    """Contender `name`'s meta-gradient step on `model` (its own copy)."""
    if setting.protonet:
        return PROTONET_CONTENDERS[name](model)
    return MAML_CONTENDERS[name](model, setting.inner_lr, setting.steps, setting.first_order)


def meta_gradients(setting: Setting, tasks: int, dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    """Every contender's meta-gradient on the same model copy and batch."""
    model, batch = build(setting, tasks, dtype)
    grads = {}
    for name in contender_names(setting):
        if is_mixed(name):
            continue
        own = copy.deepcopy(model)
        make_step(setting, name, own)(batch)
        grads[name] = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in own.parameters()]
    return grads


def agreement(setting: Setting, tasks: int) -> dict[str, float]:
    """float64 max over parameters of |g - g_fastadapt| / |g_fastadapt|, per contender.

    A conv bias before BatchNorm has a meta-gradient that is zero in exact arithmetic (~1e-15 after
    rounding, so any relative difference is noise): a parameter whose reference norm is below
    1e-9 x the whole meta-gradient's norm is compared against that whole norm instead.
    """
    grads = meta_gradients(setting, tasks, torch.float64)
    ref = grads.pop("fastadapt")
    grads = {"fastadapt": ref, **grads}
    total = float(torch.cat([r.flatten() for r in ref]).norm())
    scales = [float(r.norm()) if r.norm() > 1e-9 * total else total for r in ref]
    return {name: max(float((g - r).norm()) / scale for g, r, scale in zip(gs, ref, scales))
            for name, gs in grads.items()}


def flops_per_task(setting: Setting) -> int:
    """FLOPs of one task's meta-gradient (forward, inner loop, backward), counted on the plain loop."""
    model, batch = build(setting, 1, torch.float32)
    with FlopCounterMode(display=False) as counter:
        make_step(setting, "plain loop", model)(batch)
    return counter.get_total_flops()


def matmul_gflops(dtype: torch.dtype, size: int, seconds: float = 1.0) -> float:
    """Best GFLOP/s of a size^3 matmul over about `seconds`."""
    a, b = torch.rand(size, size, dtype=dtype), torch.rand(size, size, dtype=dtype)
    a @ b
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        a @ b
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * size**3 / best / 1e9


def timing(setting: Setting, repeats: int) -> dict[str, list[float]]:
    """Interleaved tasks/s of every contender, each on its own copy of the same model."""
    model, batch = build(setting, setting.meta_batch, torch.float32)
    models = {name: copy.deepcopy(model) for name in contender_names(setting)}
    runs = {name: (lambda step=make_step(setting, name, m): step(batch)) for name, m in models.items()}

    def clear() -> None:
        for m in models.values():
            m.zero_grad(set_to_none=True)

    return interleaved_rates(runs, setting.meta_batch, repeats, clear)


def memory_child(setting: Setting, name: str) -> None:
    """In a fresh process: peak RSS of one step above the RSS after a warm-up step; prints JSON."""
    model, batch = build(setting, setting.meta_batch, torch.float32)
    step = make_step(setting, name, model)
    step(batch)
    model.zero_grad(set_to_none=True)
    print(json.dumps({"peak_mb": peak_rss_mb(lambda: step(batch))[0]}))


def peak_memory(setting: Setting, name: str, args: argparse.Namespace) -> float:
    """Runs `memory_child` in a fresh interpreter and returns its peak-minus-baseline MB."""
    command = [sys.executable, __file__, "--memory-child", name, "--settings", setting.name,
               "--threads", str(args.threads), "--allocator", args.allocator] + (["--quick"] if args.quick else [])
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def machine() -> str:
    """The CPU model name from lscpu."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown CPU"


def span(values: list[float], fmt: str = ".1f", unit: str = "") -> str:
    """`median[unit] (min-max)`."""
    return f"{statistics.median(values):{fmt}}{unit} ({min(values):{fmt}}-{max(values):{fmt}})"


PROTONET_NOTE = ("learn2learn 0.2.0 has no ProtoNet algorithm outside its Lightning wrapper: its "
                 "`l2l.nn.PrototypicalClassifier` is used per episode; higher and TorchOpt have no ProtoNet.")


def table(setting: Setting, result: dict, ceiling: float) -> str:
    """The Markdown table of one setting."""
    unit = "episodes" if setting.protonet else "tasks"
    flops = result["flops_per_task"]
    lines = [f"### {setting.name}", "",
             f"{setting.describe()}; {flops / 1e9:.3f} GFLOP per {unit[:-1]} (plain loop, FlopCounterMode)."
             + (f" {PROTONET_NOTE}" if setting.protonet else ""), "",
             f"| contender | {unit}/s median (min-max) | fastadapt / contender per repeat, median (min-max) "
             f"| contender / {BASELINE} per repeat | peak MB above baseline | float64 max rel. diff "
             "| GFLOP/s (% of fp32 matmul) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, rates in result["rates"].items():
        diff = result["agreement"].get(name)
        void = diff is not None and diff > VOID_ABOVE
        ratio = "VOID" if void else "-" if name == "fastadapt" else span(
            repeat_ratios(result["rates"], "fastadapt", name), ".2f", "x")
        versus = span(repeat_ratios(result["rates"], name, BASELINE), ".2f", "x") if BASELINE in result["rates"] else "n/a"
        exactness = "bf16: not exact by design" if diff is None else f"{diff:.1e}{' VOID' if void else ''}"
        memory = result["peak_mb"].get(name)
        gflops = flops * statistics.median(rates) / 1e9
        lines.append(f"| {name} | {span(rates)} | {ratio} | {versus} | {'n/a' if memory is None else f'{memory:.0f}'} "
                     f"| {exactness} | {gflops:.2f} ({100 * gflops / ceiling:.1f}%) |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    names = [s.name for s in all_settings()]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=names, default=names, metavar="NAME",
                        help=f"settings to run (default all): {', '.join(names)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--agreement-tasks", type=int, default=4, help="meta-batch of the float64 check")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--json", metavar="PATH", help="write all raw numbers here")
    parser.add_argument("--quick", action="store_true", help="smoke test: meta-batch 2, 2 queries, 1 repeat")
    parser.add_argument("--allocator", choices=("default", "tuned"), default="default",
                        help="tuned: glibc keeps freed memory (fastadapt.runtime.keep_freed_memory, what the "
                             "fastadapt command does) for every contender alike")
    parser.add_argument("--memory-child", metavar="CONTENDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.agreement_tasks = 1, 2
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.allocator == "tuned":
        keep_freed_memory()
    settings = [s for s in all_settings() if s.name in args.settings]
    settings = [quick(s) for s in settings] if args.quick else settings
    if args.memory_child:
        memory_child(settings[0], args.memory_child)
        return
    size = 1024 if args.quick else 2048
    ceiling = {"fp32": matmul_gflops(torch.float32, size), "bf16": matmul_gflops(torch.bfloat16, size)}
    versions = {p: version(p) for p in PACKAGES}
    print(f"# fastadapt vs peers\n\nMachine: {machine()}, {args.threads} threads, allocator {args.allocator}. "
          + ", ".join(f"{p} {v}" for p, v in versions.items()) + ".\n")
    print(f"Command: `{' '.join([sys.executable] + sys.argv)}`\n")
    print(f"Matmul ceiling ({size}x{size} @ {size}x{size}): fp32 {ceiling['fp32']:.1f} GFLOP/s, "
          f"bf16 {ceiling['bf16']:.1f} GFLOP/s. Repeats: {args.repeats}, interleaved; float64 agreement on "
          f"{args.agreement_tasks} tasks, VOID above {VOID_ABOVE:g}.\n", flush=True)
    results = {}
    for setting in settings:
        result = {"setting": asdict(setting), "agreement": agreement(setting, args.agreement_tasks),
                  "flops_per_task": flops_per_task(setting), "rates": timing(setting, args.repeats),
                  "peak_mb": {} if args.no_memory else
                  {name: peak_memory(setting, name, args) for name in contender_names(setting)}}
        results[setting.name] = result
        print(table(setting, result, ceiling["fp32"]) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine(), "threads": args.threads, "versions": versions, "argv": sys.argv,
                       "matmul_gflops": ceiling, "matmul_size": size, "results": results}, out, indent=1)


if __name__ == "__main__":
    main()
