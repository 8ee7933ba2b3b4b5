"""The command line: `fastadapt run` meta-trains and evaluates one configuration.

Bare `fastadapt run` is the embedded default: MAML on sinusoid regression, under 2 minutes on 2 CPU
cores, reporting the query MSE before and after adaptation.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import __version__
from .algorithms import ANIL, FOMAML, MAML, MetaSGD, ProtoNet
from .data import EpisodeSampler, SinusoidTasks
from .io import write_json
from .nn import MLP, Conv4
from .train import evaluate, meta_train

__all__ = ["main", "build_parser"]

ALGORITHMS = {"maml": MAML, "fomaml": FOMAML, "metasgd": MetaSGD, "anil": ANIL, "protonet": ProtoNet}

# Defaults for every flag left unset, per dataset and then per algorithm. These are the settings
# behind docs/results.md. Omniglot MAML follows Finn et al. 2017 and learn2learn's example: one
# inner step of 0.4, meta-batch 32, one query per class while training, three inner steps at test.
# ProtoNet follows Snell et al. 2017 in training with more ways (20) than it is tested on.
DEFAULTS: dict[str, dict[str, Any]] = {
    "sinusoid": dict(algo="maml", ways=1, shots=10, queries=10, inner_steps=1, inner_lr=0.01, meta_lr=1e-3,
                     meta_batch=25, iterations=10000, eval_episodes=1000, eval_queries=100),
    "omniglot": dict(algo="maml", ways=5, shots=1, queries=1, inner_steps=1, eval_inner_steps=3, inner_lr=0.4,
                     meta_lr=3e-3, meta_batch=32, iterations=1050, eval_episodes=1000, eval_queries=15),
}
ALGORITHM_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("omniglot", "protonet"): dict(train_ways=20, queries=5, meta_lr=1e-3, meta_batch=1, iterations=2500),
}


def _checked(cast: type, accept: Any, expected: str) -> Any:
    """An argparse type: `cast` the text, then require `accept(value)`; errors say what was expected."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_positive_float = _checked(float, lambda v: v > 0, "a positive number")
_seed = _checked(int, lambda v: v >= 0, "a non-negative integer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastadapt", description="Meta-learning for PyTorch.")
    parser.add_argument("--version", action="version", version=f"fastadapt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="meta-train, then evaluate on fixed test episodes",
                              description="Meta-train, then evaluate on fixed test episodes. "
                              "Unset flags take the defaults of the dataset and algorithm (DEFAULTS in fastadapt/cli.py), "
                              "the settings behind docs/results.md.")
    run.add_argument("--algo", choices=sorted(ALGORITHMS))
    run.add_argument("--dataset", choices=sorted(DEFAULTS), default="sinusoid")
    run.add_argument("--ways", type=_positive_int, help="classes per episode (omniglot)")
    run.add_argument("--train-ways", type=_positive_int, help="classes per training episode (default: --ways)")
    run.add_argument("--shots", type=_positive_int, help="support examples per class")
    run.add_argument("--queries", type=_positive_int, help="query examples per class in training episodes")
    run.add_argument("--eval-queries", type=_positive_int, help="query examples per class in test episodes")
    run.add_argument("--inner-steps", type=_positive_int, help="inner SGD steps (training)")
    run.add_argument("--eval-inner-steps", type=_positive_int, help="inner SGD steps at test time (default: --inner-steps)")
    run.add_argument("--inner-lr", type=_positive_float)
    run.add_argument("--meta-lr", type=_positive_float, help="Adam learning rate of the outer loop")
    run.add_argument("--meta-batch", type=_positive_int, help="tasks per outer step")
    run.add_argument("--iterations", type=_positive_int, help="outer steps")
    run.add_argument("--eval-episodes", type=_positive_int, help="fixed test episodes (>= 2)")
    run.add_argument("--data-root", help="folder holding omniglot/ (default: $FASTADAPT_DATA)")
    run.add_argument("--seed", type=_seed, default=0, help="seed of the initial weights and training episodes")
    run.add_argument("--eval-seed", type=_seed, default=0, help="seed of the test episodes (shared by all runs)")
    run.add_argument("--threads", type=_positive_int, help="torch intra-op threads (default: torch's choice)")
    run.add_argument("--out", type=Path, default=Path("runs/latest"), help="where results.json goes")
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = dict(DEFAULTS[args.dataset])
    settings.update(ALGORITHM_DEFAULTS.get((args.dataset, args.algo or settings["algo"]), {}))
    for key, value in vars(args).items():
        if value is not None and key not in ("command", "out"):
            settings[key] = value
    settings.setdefault("train_ways", settings["ways"])
    if args.eval_inner_steps is None:  # at least as many steps at test time as in training
        settings["eval_inner_steps"] = max(settings["inner_steps"], settings.get("eval_inner_steps", 1))
    if settings["algo"] == "protonet":  # no inner loop
        for key in ("inner_steps", "eval_inner_steps", "inner_lr"):
            settings.pop(key)
    if settings["eval_episodes"] < 2:
        raise SystemExit("fastadapt: error: --eval-episodes must be >= 2 for a confidence interval")
    if args.dataset == "sinusoid" and settings["algo"] in ("protonet",):
        raise SystemExit("fastadapt: error: --algo protonet needs a classification dataset; sinusoid is regression")
    return settings


def _build(settings: dict[str, Any]):
    """The learner and the train/test task sources for these settings."""
    torch.manual_seed(settings["seed"])
    algo = settings["algo"]
    if settings["dataset"] == "sinusoid":
        model, kind = MLP(1, [40, 40], 1), "regression"
        train = SinusoidTasks(settings["shots"], settings["queries"], seed=settings["seed"])
        test = SinusoidTasks(settings["shots"], settings["eval_queries"], seed=10_000 + settings["eval_seed"])
    else:
        from .data.omniglot import omniglot_splits

        splits = omniglot_splits(settings.get("data_root"))
        kind = "classification"
        model = Conv4.omniglot(ways=None if algo == "protonet" else settings["ways"])
        train = EpisodeSampler(splits["train"], settings["train_ways"], settings["shots"], settings["queries"], seed=settings["seed"])
        test = EpisodeSampler(splits["test"], settings["ways"], settings["shots"], settings["eval_queries"], seed=settings["eval_seed"])
        if algo != "protonet" and settings["train_ways"] != settings["ways"]:
            raise SystemExit("fastadapt: error: --train-ways differs from --ways, which only protonet supports")
    if algo == "protonet":
        learner = ProtoNet(model)
    else:
        learner = ALGORITHMS[algo](model, inner_lr=settings["inner_lr"], inner_steps=settings["inner_steps"], task=kind)
    return learner, train, test


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = _settings(args)
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    started = time.perf_counter()
    try:
        learner, train, test = _build(settings)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"fastadapt: error: {error}") from None
    print(f"fastadapt {__version__}: {settings['algo']} on {settings['dataset']} "
          f"({settings['ways']}-way {settings['shots']}-shot)" if settings["dataset"] != "sinusoid"
          else f"fastadapt {__version__}: {settings['algo']} on sinusoid regression ({settings['shots']} shots)",
          flush=True)

    def progress(step: int, row: dict[str, float]) -> None:
        rate = step * settings["meta_batch"] / (time.perf_counter() - train_start)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in row.items())
        print(f"step {step:>6}/{settings['iterations']}  {shown}  {rate:.1f} tasks/s", flush=True)

    train_start = time.perf_counter()
    meta_train(learner, train, iterations=settings["iterations"], meta_batch=settings["meta_batch"],
               meta_lr=settings["meta_lr"], on_step=progress, log_every=max(1, settings["iterations"] // 20))
    train_seconds = time.perf_counter() - train_start
    estimates = evaluate(learner, test, settings["eval_episodes"], inner_steps=settings.get("eval_inner_steps"))
    metric = "accuracy" if "accuracy" in estimates else "loss"
    result = {
        "metric": metric if metric == "accuracy" else "mse",
        "mean": estimates[metric].mean,
        "ci95": estimates[metric].ci95,
        "episodes": estimates[metric].episodes,
        "seed": settings["seed"],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()},
        "wall_time_s": time.perf_counter() - started,
        "train_time_s": train_seconds,
        "metrics": {k: {"mean": e.mean, "ci95": e.ci95} for k, e in estimates.items()},
        "versions": {"fastadapt": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", result)
    if metric == "loss":
        before = estimates["loss_before"]
        print(f"pre-adaptation mse {before}  ->  post-adaptation mse {estimates['loss']}  "
              f"(95% CI, {before.episodes} test episodes)")
    print(f"test {result['metric']}: {result['mean']:.4f} +- {result['ci95']:.4f} (95% CI over "
          f"{result['episodes']} episodes)  wall time {result['wall_time_s']:.1f} s  -> {args.out / 'results.json'}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    if args.command == "run":
        run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
