"""Where iMAML's float32 meta-gradient parts from the float64 one, task by task, on real Omniglot
training tasks of a run (its initial weights or a checkpoint).

Per task it compares, each relative to the float64 quantity's norm:
- `phi`: the adapted weights, float32 against float64 (relative to the float64 inner displacement);
- `phi, theta moved 1e-7`: float64 against float64 from theta moved by 1e-7 of its norm in a random
  direction: how strongly the inner problem itself amplifies a tiny change (no float32 involved);
- `query gradient, float32 arithmetic`: float32 against float64 at the same (float32) adapted weights;
- `meta-gradient, float32 arithmetic`: the float32 meta-gradient (query gradient and conjugate
  gradient) against float64 at the same adapted weights;
- `meta-gradient, phi's difference alone`: float64 at the float32 adapted weights against float64 at
  its own;
- `meta-gradient, end to end`: float32 against float64.

    FASTADAPT_DATA=../shared/data python benchmarks/imaml_float32.py runs/RUN --checkpoint init --tasks 200
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from torch import Tensor

from fastadapt.algorithms import IMAML
from fastadapt.api import run_config
from fastadapt.data.episodes import Episode
from fastadapt.functional import forward
from fastadapt.training.checkpoint import load_checkpoint, load_module_tensors
from fastadapt.training.experiment import build_experiment


def _norm(vectors: list[Tensor]) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in vectors)))


def _relative(a: list[Tensor], b: list[Tensor], scale: list[Tensor] | None = None) -> float:
    return _norm([x.double() - y.double() for x, y in zip(a, b)]) / _norm(scale if scale is not None else b)


def _adapted(imaml: IMAML, theta: dict[str, Tensor], episode: Episode, dtype: torch.dtype) -> dict[str, Tensor]:
    frozen = imaml._split()[1]
    return imaml._solve(theta, frozen, episode.support_x.to(dtype), episode.support_y, imaml.inner_steps, imaml.lam)[0]


def _meta_gradient(imaml: IMAML, phi: dict[str, Tensor], episode: Episode, dtype: torch.dtype
                   ) -> tuple[list[Tensor], list[Tensor]]:
    """(query gradient, implicit meta-gradient) at `phi`, in `imaml`'s precision."""
    frozen = imaml._split()[1]
    v = imaml._query_gradient(phi, frozen, (episode.query_x.to(dtype), episode.query_y))[0]
    support_x = episode.support_x.to(dtype)
    g = imaml._implicit_solve(lambda p: imaml._loss_fn(forward(imaml.model, {**frozen, **p}, support_x), episode.support_y),
                              phi, v, batched=False)
    return v, g


def task_errors(imaml32: IMAML, imaml64: IMAML, episode: Episode, generator: torch.Generator) -> dict[str, float]:
    """The relative differences listed in the module docstring, for one task."""
    theta32, theta64 = imaml32._split()[0], imaml64._split()[0]
    phi32 = _adapted(imaml32, theta32, episode, torch.float32)
    phi64 = _adapted(imaml64, theta64, episode, torch.float64)
    displacement = [p - t for p, t in zip(phi64.values(), theta64.values())]
    direction = {k: torch.randn(t.shape, generator=generator, dtype=torch.float64) for k, t in theta64.items()}
    scale = 1e-7 * _norm(list(theta64.values())) / _norm(list(direction.values()))
    moved = _adapted(imaml64, {k: t + scale * direction[k] for k, t in theta64.items()}, episode, torch.float64)
    v32, g32 = _meta_gradient(imaml32, phi32, episode, torch.float32)
    v64_at32, g64_at32 = _meta_gradient(imaml64, {k: p.double() for k, p in phi32.items()}, episode, torch.float64)
    g64 = _meta_gradient(imaml64, phi64, episode, torch.float64)[1]
    return {
        "phi": _relative(list(phi32.values()), list(phi64.values()), displacement),
        "phi, theta moved 1e-7": _relative(list(moved.values()), list(phi64.values()), displacement),
        "query gradient, float32 arithmetic": _relative(v32, v64_at32),
        "meta-gradient, float32 arithmetic": _relative(g32, g64_at32),
        "meta-gradient, phi's difference alone": _relative(g64_at32, g64),
        "meta-gradient, end to end": _relative(g32, g64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--checkpoint", default="init", help="'init' or a checkpoint name, e.g. step-000000500")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--first-task", type=int, default=1000, help="index of the first training task")
    parser.add_argument("--inner-lr", type=float, help="another inner step size than the run's")
    args = parser.parse_args()
    torch.set_num_threads(1)
    experiment = build_experiment(run_config(args.run))
    imaml32 = experiment.learner
    if not isinstance(imaml32, IMAML):
        raise SystemExit(f"{args.run} is not an iMAML run (its learner is {type(imaml32).__name__})")
    if args.checkpoint != "init":
        manifest = args.run / "checkpoints" / f"{args.checkpoint}.json"
        load_module_tensors(imaml32, load_checkpoint(manifest)[0], "learner.", manifest)
    if args.inner_lr is not None:
        imaml32.inner_lr = args.inner_lr
    imaml64 = copy.deepcopy(imaml32).double()
    batch = experiment.train.task_batch(args.first_task, args.tasks)
    generator = torch.Generator().manual_seed(0)
    rows = [task_errors(imaml32, imaml64, batch[t], generator) for t in range(args.tasks)]
    print(f"{args.run} at {args.checkpoint}, inner_lr {imaml32.inner_lr}: {args.tasks} training tasks "
          f"from task {args.first_task}")
    print("| relative difference | median | 90th percentile | max | tasks > 1e-3 | tasks > 1e-1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key in rows[0]:
        values = sorted(r[key] for r in rows)
        print(f"| {key} | {statistics.median(values):.1e} | {values[int(0.9 * (len(values) - 1))]:.1e} | "
              f"{values[-1]:.1e} | {sum(v > 1e-3 for v in values)} | {sum(v > 1e-1 for v in values)} |")


if __name__ == "__main__":
    main()
