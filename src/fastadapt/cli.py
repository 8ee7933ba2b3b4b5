"""The command line.

    fastadapt run [flags]                         meta-train and test one configuration from flags
    fastadapt train RECIPE [--set k=v] [--out D]  the same from a YAML recipe; --resume D continues D
    fastadapt eval RUN_DIR [--shots K ...]        evaluate a trained run on fixed test episodes
    fastadapt report RUN_DIR [RUN_DIR ...]        plots and a comparison table

Bare `fastadapt run` is the embedded default: MAML on sinusoid regression, under 2 minutes on 2 CPU
cores, reporting the query MSE before and after adaptation.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .api import default_run_dir, evaluate, resolve_config, run_config, train
from .data.registry import dataset_info
from .runtime import keep_freed_memory
from .training.checkpoint import CheckpointError
from .training.config import (ALGORITHMS, BACKBONES, DATASETS, DEVICE_PATTERN, IMAML_PROXIMAL, Config, ConfigError,
                              parse_overrides)

__all__ = ["main", "build_parser"]

# `fastadapt run` defaults, per dataset and then per algorithm, for every flag left unset: the
# settings behind docs/results.md. Omniglot MAML follows Finn et al. 2017 and learn2learn's
# example (one inner step of 0.4, meta-batch 32, one query per class in training, three inner
# steps at test); ProtoNet follows Snell et al. 2017 in training with more ways (20) than tested.
RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    "sinusoid": dict(backbone="mlp", shots=10, queries=10, eval_queries=100, inner_steps=1, inner_lr=0.01,
                     meta_lr=1e-3, meta_batch=25, iterations=10000, eval_episodes=1000),
    "omniglot": dict(backbone="conv4", ways=5, shots=1, queries=1, eval_queries=15, inner_steps=1,
                     eval_inner_steps=3, inner_lr=0.4, meta_lr=3e-3, meta_batch=32, iterations=1050,
                     eval_episodes=1000),
}
ALGORITHM_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("omniglot", "protonet"): dict(train_ways=20, queries=5, meta_lr=1e-3, meta_batch=1, iterations=2500),
    # MAML++: the released Omniglot configs (recipes/mamlpp/), but the run's short budget
    # (the multi-step loss over the first 10% of the iterations, as 10 of the configs' 100 epochs)
    ("omniglot", "maml++"): dict(inner_steps=5, eval_inner_steps=5, inner_lr=0.1, meta_lr=1e-3, meta_batch=16,
                                 schedule="cosine", min_meta_lr=1e-5, multi_step_loss_iterations=105),
    # Reptile: the paper's 5-way Omniglot settings (recipes/reptile/), but the run's short budget and the
    # max-pooling Conv4 (the recipes use the paper's strided network: --backbone conv4-strided); on
    # sinusoids serial Reptile with 32 inner SGD steps, as the paper's sine-wave demonstration
    ("omniglot", "reptile"): dict(train_shots=10, queries=1, inner_optimizer="adam", inner_lr=1e-3, inner_steps=5,
                                  inner_batch=10, eval_inner_steps=50, eval_inner_batch=5, inner_state="persistent",
                                  optimizer="sgd", meta_momentum=0.0, meta_lr=1.0, schedule="linear", meta_batch=5,
                                  # 50 inner steps per test episode: ~0.35 s each on 1 core
                                  iterations=500, eval_episodes=500),
    ("sinusoid", "reptile"): dict(inner_steps=32, eval_inner_steps=32, optimizer="sgd", meta_momentum=0.0,
                                  meta_lr=1.0, schedule="linear", meta_batch=1, iterations=3000),
    # Matching Networks: trained on test-like episodes (5-way), ProtoNet's queries, Adam and budget
    ("omniglot", "matchingnet"): dict(queries=5, meta_lr=1e-3, meta_batch=1, iterations=2500),
    # iMAML: the recipes' inner problem and damped system (recipes/imaml/: inner SGD 0.1, lambda 2,
    # 5 CG steps, damping 22 from the authors' code), 5 inner steps instead of 16 and the short
    # budget; baseline: Chen et al.'s pre-training (batches of 16, Adam 1e-3) for 1 epoch instead of 5
    ("omniglot", "imaml"): dict(inner_steps=5, eval_inner_steps=5, inner_lr=0.1, imaml_lambda=2.0, cg_steps=5,
                                cg_damping=22.0, meta_lr=3e-3, meta_batch=8, iterations=250),
    ("omniglot", "baseline"): dict(train_ways=16, train_shots=1, meta_lr=1e-3, meta_batch=1, iterations=6000),
    # iMAML on sinusoids (no published setting; ours, measured in docs/methods/imaml.md): MAML's step
    # size over 10 inner steps with a weak proximal term, 10,000 tasks
    ("sinusoid", "imaml"): dict(inner_steps=10, eval_inner_steps=10, inner_lr=0.01, imaml_lambda=0.5, meta_batch=10,
                                iterations=1000),
}
# flag name (argparse dest) -> config key, where they differ
_FLAG_KEYS = {"algo": "algorithm"}


def _checked(cast: type, accept: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
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


def _dataset(text: str) -> str:
    """An argparse type: a registered dataset (`data.registry`), else the error names the known ones."""
    try:
        dataset_info(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


_positive_float = _checked(float, lambda v: v > 0, "a positive number")
_non_negative_float = _checked(float, lambda v: v >= 0, "a number >= 0")
_seed = _checked(int, lambda v: v >= 0, "a non-negative integer")
_device = _checked(str, lambda v: re.fullmatch(DEVICE_PATTERN, v) is not None, "cpu, cuda or cuda:N")
_DEVICE_HELP = "where the learner and episodes live: cpu, cuda or cuda:N"
_TASK_WORKERS_HELP = ("MAML family and imaml on conv4, CPU: train this many tasks (task groups) and evaluate "
                      "this many episode batches at once, one thread each (a --threads 1 run's numbers; "
                      "faster on 2+ cores, more memory)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastadapt", description="Meta-learning for PyTorch.")
    parser.add_argument("--version", action="version", version=f"fastadapt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="meta-train, then evaluate on fixed test episodes",
                              description="Meta-train, then evaluate on fixed test episodes. Unset flags take the "
                              "defaults of the dataset and algorithm (RUN_DEFAULTS in fastadapt/cli.py), the "
                              "settings behind docs/results.md.")
    run.add_argument("--algo", choices=ALGORITHMS, default="maml")
    run.add_argument("--dataset", type=_dataset, default="sinusoid",
                     help=f"{', '.join(DATASETS)} (default sinusoid; data under --data-root)")
    run.add_argument("--backbone", choices=BACKBONES, help="mlp (sinusoid), conv4 (image datasets, max-pooling), "
                     "conv4-strided (stride-2 convolutions instead of pooling, the Reptile paper's network) or "
                     "resnet12 (64-160-320-640 channels)")
    run.add_argument("--ways", type=_positive_int, help="classes per test episode (classification)")
    run.add_argument("--train-ways", type=_positive_int, help="classes per training episode or pre-training batch (protonet, matchingnet, baseline; default: --ways)")
    run.add_argument("--shots", type=_positive_int, help="support examples per class")
    run.add_argument("--queries", type=_positive_int, help="query examples per class in training episodes")
    run.add_argument("--eval-queries", type=_positive_int, help="query examples per class in test episodes")
    run.add_argument("--inner-steps", type=_positive_int, help="inner optimizer steps (training)")
    run.add_argument("--eval-inner-steps", type=_positive_int, help="inner optimizer steps at test time")
    run.add_argument("--inner-lr", type=_positive_float)
    run.add_argument("--meta-lr", type=_positive_float, help="learning rate of the outer optimizer (Adam; SGD for reptile); a default cosine floor (maml++) keeps its ratio to it")
    run.add_argument("--meta-batch", type=_positive_int, help="tasks per outer step")
    run.add_argument("--iterations", type=_positive_int, help="outer steps")
    run.add_argument("--eval-episodes", type=_positive_int, help="fixed test episodes (>= 2)")
    run.add_argument("--data-root", help="folder holding omniglot/, mnist/, mini-imagenet/ (default: $FASTADAPT_DATA)")
    run.add_argument("--image-size", type=_positive_int, help="folder datasets: decode images at this size (default: "
                     "their own; mini-imagenet 84)")
    run.add_argument("--channels", type=int, choices=(1, 3), help="folder datasets: 1 (grey) or 3 (RGB)")
    run.add_argument("--seed", type=_seed, default=0, help="seed of the initial weights and training episodes")
    run.add_argument("--eval-seed", type=_seed, default=0, help="seed of the test episodes (shared by all runs)")
    run.add_argument("--threads", type=_positive_int, help="torch intra-op threads (default: torch's choice)")
    run.add_argument("--task-workers", type=_positive_int, help=_TASK_WORKERS_HELP + " (default 1)")
    run.add_argument("--precision", choices=("fp32", "bf16"),
                     help="bf16: bf16 autocast, float32 weights and meta-gradients (default fp32)")
    run.add_argument("--device", type=_device, help=_DEVICE_HELP + " (default cpu)")
    run.add_argument("--head", choices=("linear", "cosine"), help="baseline: linear (Baseline) or cosine (Baseline++)")
    run.add_argument("--imaml-lambda", type=_positive_float, help="imaml: strength of the proximal term")
    run.add_argument("--cg-steps", type=_positive_int, help="imaml: conjugate-gradient iterations")
    run.add_argument("--imaml-proximal", choices=IMAML_PROXIMAL,
                     help="imaml: the proximal term in every inner step (the paper; default) or one pull-back "
                          "step after plain steps (the authors' code)")
    run.add_argument("--eval-imaml-lambda", type=_non_negative_float,
                     help="imaml: proximal strength at test time (default: --imaml-lambda; 0: plain fine-tuning)")
    run.add_argument("--out", type=Path, help="run directory (default: runs/run-<date>-<time>)")

    recipe = commands.add_parser("train", help="meta-train and test from a YAML recipe",
                                 description="Meta-train and test from a YAML recipe (see recipes/).")
    recipe.add_argument("recipe", nargs="?", type=Path, help="the recipe (not needed with --resume)")
    recipe.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one recipe key, e.g. --set shots=5 (repeatable)")
    recipe.add_argument("--out", type=Path, help="run directory (default: runs/<name>)")
    recipe.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    recipe.add_argument("--device", type=_device,
                        help=_DEVICE_HELP + " (default: the recipe's); with --resume, where the run continues")
    recipe.add_argument("--threads", type=_positive_int,
                        help="torch intra-op threads (default: the recipe's); with --resume, for this resumed process")
    recipe.add_argument("--task-workers", type=_positive_int,
                        help=_TASK_WORKERS_HELP + " (default: the recipe's); with --resume, for this resumed process")

    ev = commands.add_parser("eval", help="evaluate a trained run on fixed test episodes")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--episodes", type=_positive_int, default=1000, help="test episodes (default 1000)")
    ev.add_argument("--dataset", type=_dataset, help="test on this dataset's test split instead (cross-domain; "
                    f"{', '.join(DATASETS)}); its inputs must have the model's shape")
    ev.add_argument("--ways", type=_positive_int)
    ev.add_argument("--shots", type=_positive_int)
    ev.add_argument("--queries", type=_positive_int)
    ev.add_argument("--inner-steps", type=_positive_int, nargs="+", help="one or more inner step counts")
    ev.add_argument("--device", type=_device, help=_DEVICE_HELP + " (default: the run's)")
    ev.add_argument("--threads", type=_positive_int, help="torch intra-op threads (default: the run's)")
    ev.add_argument("--task-workers", type=_positive_int,
                    help="MAML family and imaml on conv4, CPU: evaluate this many batches of episodes at once, one "
                         "thread each (a one-thread evaluation's numbers; default: the run's)")
    ev.add_argument("--imaml-lambda", type=_non_negative_float, metavar="LAMBDA",
                    help="iMAML runs: proximal strength of the test-time inner problem (default: the run's; "
                         "0: plain fine-tuning, the authors' measure_accuracy.py)")
    ev.add_argument("--ensemble", type=_positive_int, default=1, metavar="K",
                    help="average the outputs of the run's K best validated checkpoints (MAML++'s protocol: 5; "
                         "the run must keep them: keep_best >= K); default 1, the best checkpoint alone")

    rep = commands.add_parser("report", help="plots and a Markdown table comparing runs")
    rep.add_argument("run_dirs", type=Path, nargs="+")
    rep.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: report/)")
    return parser


def _run_config(args: argparse.Namespace) -> Config:
    defaults = args.dataset if args.dataset in RUN_DEFAULTS else "omniglot"  # any image dataset: Omniglot's
    values = dict(RUN_DEFAULTS[defaults])
    values.update(ALGORITHM_DEFAULTS.get((defaults, args.algo), {}))
    given = {_FLAG_KEYS.get(k, k): v for k, v in vars(args).items() if v is not None and k not in ("command", "out")}
    if "inner_steps" in given and "eval_inner_steps" not in given:  # at least as many steps at test time
        # (MAML++'s per-step rates and BatchNorm weights exist for the training steps only)
        given["eval_inner_steps"] = (given["inner_steps"] if args.algo == "maml++"
                                     else max(given["inner_steps"], values.get("eval_inner_steps", 1)))
    if "min_meta_lr" in values and "meta_lr" in given:  # a default cosine floor keeps its ratio to the rate
        values["min_meta_lr"] *= given["meta_lr"] / values["meta_lr"]
    values = {**values, **given}
    values["log_every"] = max(1, values["iterations"] // 20)
    return Config.from_dict(values)


def _printer(config: Config) -> Callable[[dict[str, Any]], None]:
    def show(row: dict[str, Any]) -> None:
        parts = [f"{row['phase']:<10} step {row['step']:>6}/{config.iterations}", f"loss {row['loss']:.4f}"]
        if row["accuracy"] is not None:
            parts.append(f"accuracy {row['accuracy']:.4f}")
        if row["tasks_per_s"] is not None:
            parts.append(f"{row['tasks_per_s']:.1f} tasks/s")
        print("  ".join(parts), flush=True)

    return show


def _summary(results: dict[str, Any], run_dir: Path) -> None:
    if results["metric"] == "mse":
        before, after = results["metrics"]["loss_before"], results["metrics"]["loss"]
        print(f"pre-adaptation mse {before['mean']:.4f} +- {before['ci95']:.4f}  ->  post-adaptation mse "
              f"{after['mean']:.4f} +- {after['ci95']:.4f}  (95% CI, {results['episodes']} test episodes)")
    print(f"test {results['metric']}: {results['mean']:.4f} +- {results['ci95']:.4f} (95% CI over "
          f"{results['episodes']} episodes)  wall time {results['wall_time_s']:.1f} s  -> {run_dir / 'results.json'}")


def _train(config: Config | None, run_dir: Path, resume: bool, device: str | None = None,
           threads: int | None = None, task_workers: int | None = None) -> None:
    shown = run_config(run_dir) if resume else config
    assert shown is not None
    print(f"fastadapt {__version__}: {shown.algorithm} on {shown.dataset} "
          + (f"({shown.ways}-way {shown.shots}-shot)" if shown.task == "classification" else f"({shown.shots} shots)")
          + f"  -> {run_dir}", flush=True)
    interactive = sys.stderr.isatty()
    results = train(config, run_dir, resume=resume, device=device, threads=threads, task_workers=task_workers,
                    progress=interactive, on_row=None if interactive else _printer(shown))
    _summary(results, run_dir)


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "run":
        out = args.out or Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
        _train(_run_config(args), out, resume=False)
    elif args.command == "train":
        if args.resume is not None:
            if args.recipe is not None or args.overrides:
                raise ConfigError("--resume continues a run with its own config: give no recipe or --set")
            _train(None, args.resume, resume=True, device=args.device, threads=args.threads,
                   task_workers=args.task_workers)
            return
        if args.recipe is None:
            raise ConfigError("train needs a RECIPE (a YAML file, see recipes/) or --resume RUN_DIR")
        config = resolve_config(args.recipe, parse_overrides(args.overrides))
        _train(config, args.out or default_run_dir(config), resume=False, device=args.device, threads=args.threads,
               task_workers=args.task_workers)
    elif args.command == "eval":
        for steps in args.inner_steps or [None]:
            result = evaluate(args.run_dir, episodes=args.episodes, ways=args.ways, shots=args.shots,
                              queries=args.queries, inner_steps=steps, device=args.device, ensemble=args.ensemble,
                              threads=args.threads, imaml_lambda=args.imaml_lambda, task_workers=args.task_workers,
                              dataset=args.dataset)
            ways = f"{result['ways']}-way " if result["metric"] == "accuracy" else ""
            label = f"{ways}{result['shots']}-shot" + (
                f", {result['inner_steps']} inner steps" if result["inner_steps"] else "") + (
                f", lambda {result['imaml_lambda']:g}" if "imaml_lambda" in result else "") + (
                f", ensemble of the {args.ensemble} best checkpoints" if args.ensemble > 1 else "")
            where = f" on {result['dataset']}" if result["dataset"] != result["trained_on"] else ""
            print(f"{label}{where}: {result['metric']} {result['mean']:.4f} +- {result['ci95']:.4f} "
                  f"(95% CI over {result['episodes']} episodes)")
    elif args.command == "report":
        from .training.report import write_report

        files = write_report(args.run_dirs, args.out)
        print(f"report written to {args.out}: " + ", ".join(str(p.name) for p in files.paths))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # a training process reuses the same large blocks: see fastadapt.runtime
    try:
        _dispatch(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ImportError, ValueError) as error:
        print(f"fastadapt: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
