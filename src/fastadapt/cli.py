"""The command line.

    fastadapt run [flags]                         meta-train and test one configuration from flags
    fastadapt train RECIPE [--set k=v] [--out D]  the same from a YAML recipe; --resume D continues D
    fastadapt eval RUN_DIR [--shots K ...]        evaluate a trained run on fixed test episodes
    fastadapt robustness RUN_DIR --eps E ...      the run under attack, label noise or corruptions
    fastadapt report RUN_DIR [RUN_DIR ...]        plots and a comparison table

Bare `fastadapt run` is the embedded default: MAML on sinusoid regression, under 2 minutes on 2 CPU
cores, reporting the query MSE before and after adaptation.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, get_args, get_origin

import yaml
from pydantic import ValidationError

from . import __version__
from .api import calibrate, default_run_dir, detect_ood, evaluate, evaluate_robustness, resolve_config, run_config, train
from .robust import CORRUPTIONS, NOISE_KINDS, SEVERITIES, fgsm, noisy_per_class, pgd
from .robust.label_noise import allowed_rates
from .robust.corruptions import WHERE
from .robust.evaluation import TARGETS
from .runtime import keep_freed_memory
from .training.checkpoint import CheckpointError
from .training.loop import TrainingDiverged
from .training.config import EXECUTION_KEYS, SECTIONS, Config, ConfigError, describe_expected, field_check, key_kind
from .training.recipes import parse_overrides, run_recipe
from .training.robustness_report import condition_label

__all__ = ["main", "build_parser"]

# config keys whose flag is spelled otherwise than `--key-name`
_FLAG_NAMES = {"algorithm": "--algo"}


def _flag_type(key: str) -> Callable[[str], Any]:
    """The argparse type of a config key's flag (an int, float or str key; `Literal` keys take
    argparse choices): the text read as the key's type, then checked against the key's range in
    the schema; an error says what the key allows."""
    cast = key_kind(key)
    check = field_check(key)

    def parse(text: str) -> Any:
        try:
            return check.validate_python(cast(text))
        except ValidationError as error:
            cause = (error.errors()[0].get("ctx") or {}).get("error")
            why = str(cause) if isinstance(cause, ConfigError) else None
        except ValueError:
            why = None
        raise argparse.ArgumentTypeError(why or f"expected {describe_expected(key, null=False)}, got {text!r}")

    return parse


def _add_key_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, key: str, help: str | None = None) -> None:
    """A flag for config key `key`, its type, choices and help from the schema; unset is None."""
    field = Config.model_fields[key]
    kind = key_kind(key)
    flag = _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))
    text = help or field.description
    if kind is bool:
        parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, help=text)
    elif get_origin(kind) is Literal:
        choices = get_args(kind)
        parser.add_argument(flag, dest=key, type=type(choices[0]), choices=choices, help=text)
    else:
        parser.add_argument(flag, dest=key, type=_flag_type(key), metavar=key.upper(), help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastadapt", description="Meta-learning for PyTorch.")
    parser.add_argument("--version", action="version", version=f"fastadapt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="meta-train, then evaluate on fixed test episodes",
        usage="fastadapt run [--algo ALGO] [--dataset DATASET] [--KEY VALUE ...] [--out DIR] [--print-config] "
        "(--help lists a flag for every config key)",
        description="Meta-train, then evaluate on fixed test episodes. One flag per config key; unset flags "
        "take the built-in recipe's values for the dataset and algorithm (fastadapt/training/run.yaml), the settings behind "
        "docs/results.md, else the schema's defaults (fastadapt/training/config.py). --print-config shows the "
        "result.")
    run.add_argument("--out", type=Path, help="run directory (default: runs/run-<date>-<time>)")
    run.add_argument("--print-config", action="store_true", help="print the config these flags give, as a recipe "
                     "(YAML), and exit")
    for section in SECTIONS:
        group = run.add_argument_group(section.title + (f" (for {', '.join(section.applies_to)})"
                                                        if section.applies_to else ""))
        for key in section.model_fields:
            _add_key_flag(group, key)

    recipe = commands.add_parser("train", help="meta-train and test from a YAML recipe",
                                 description="Meta-train and test from a YAML recipe (see recipes/).")
    recipe.add_argument("recipe", nargs="?", type=Path, help="the recipe (not needed with --resume)")
    recipe.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one recipe key, e.g. --set shots=5 (repeatable)")
    recipe.add_argument("--out", type=Path, help="run directory (default: runs/<name>)")
    recipe.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    for key in EXECUTION_KEYS:  # where and how fast, not what: a resumed run may change them
        _add_key_flag(recipe, key, f"{Config.model_fields[key].description} (default: the recipe's; with --resume, "
                      "for this resumed process)")

    ev = commands.add_parser("eval", help="evaluate a trained run on fixed test episodes")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--episodes", type=_flag_type("eval_episodes"), default=1000, help="test episodes (default 1000)")
    _add_key_flag(ev, "dataset", "test on this dataset's test split instead (cross-domain; omniglot, mnist, "
                  "mini-imagenet, folder:PATH); its inputs must have the model's shape")
    _add_episode_flags(ev)
    ev.add_argument("--inner-steps", type=_flag_type("inner_steps"), nargs="+", help="one or more inner step counts")
    for key in ("device", "threads", "task_workers"):
        _add_key_flag(ev, key, f"{Config.model_fields[key].description} (default: the run's)")
    ev.add_argument("--imaml-lambda", type=_flag_type("eval_imaml_lambda"), metavar="LAMBDA",
                    help="iMAML runs: proximal strength of the test-time inner problem (default: the run's; "
                         "0: plain fine-tuning, the authors' measure_accuracy.py)")
    ev.add_argument("--ensemble", type=_flag_type("keep_best"), default=1, metavar="K",
                    help="average the outputs of the run's K best validated checkpoints (MAML++'s protocol: 5; "
                         "the run must keep them: keep_best >= K); default 1, the best checkpoint alone")
    ev.add_argument("--members", type=Path, nargs="+", default=[], metavar="RUN",
                    help="other runs (other seeds) forming a deep ensemble with RUN_DIR: probabilities averaged")
    ev.add_argument("--samples", type=_flag_type("eval_samples"), metavar="S",
                    help="vampire, platipus: weight samples per episode (default: the run's eval_samples)")
    ev.add_argument("--calibrated", action="store_true",
                    help="classification: divide the logits by the temperature `fastadapt calibrate` fitted on "
                         "validation episodes at the same setting")

    cal = commands.add_parser("calibrate", help="fit a classification run's temperature on validation episodes",
                              description="Fit the temperature of a trained classification run on validation episodes "
                              "(never test ones) and store it in RUN_DIR/calibration/; `fastadapt eval --calibrated` "
                              "at the same ways / shots / queries / inner steps applies it. The run needs a validation "
                              "split (validation_characters > 0 on omniglot).")
    cal.add_argument("run_dir", type=Path)
    cal.add_argument("--episodes", type=_flag_type("eval_episodes"), default=500,
                     help="validation episodes (default 500)")
    _add_episode_flags(cal)
    cal.add_argument("--inner-steps", type=_flag_type("inner_steps"), help="inner steps (default: the run's evaluation's)")
    cal.add_argument("--ensemble", type=_flag_type("keep_best"), default=1, metavar="K",
                     help="the mean of the run's K best validated checkpoints (default 1)")
    cal.add_argument("--members", type=Path, nargs="+", default=[], metavar="RUN",
                     help="other runs forming a deep ensemble with RUN_DIR (as in eval)")
    for key in ("device", "threads"):
        _add_key_flag(cal, key, f"{Config.model_fields[key].description} (default: the run's)")

    ood = commands.add_parser("ood", help="tell another dataset's tasks from the run's own by predictive entropy",
                              description="Score test tasks of the run's dataset and of another (--against) by the "
                              "mean predictive entropy of their queries and report the AUROC of telling them apart "
                              "(1: separated, 0.5: chance), written to RUN_DIR/ood/<...>.json.")
    ood.add_argument("run_dir", type=Path)
    ood.add_argument("--against", default="mnist", help="the out-of-distribution dataset (default mnist)")
    ood.add_argument("--episodes", type=_flag_type("eval_episodes"), default=500, help="tasks of each (default 500)")
    ood.add_argument("--inner-steps", type=_flag_type("inner_steps"), help="inner steps (default: the run's evaluation's)")
    ood.add_argument("--calibrated", action="store_true", help="with the temperature `fastadapt calibrate` fitted")
    ood.add_argument("--members", type=Path, nargs="+", default=[], metavar="RUN",
                     help="other runs forming a deep ensemble with RUN_DIR (as in eval)")
    for key in ("device", "threads"):
        _add_key_flag(ood, key, f"{Config.model_fields[key].description} (default: the run's)")

    rob = commands.add_parser("robustness", help="a trained run under attack, label noise or corruption",
                              description="Evaluate a trained classification run on fixed test episodes, clean and "
                              "under each condition given, one at a time: an attack at each radius (on the query "
                              "sets after adaptation, on the support sets through adaptation, or both), label noise in the support sets, input corruptions; "
                              "mean +- 95%% CI each, written to RUN_DIR/robustness/<...>.json.")
    rob.add_argument("run_dir", type=Path)
    rob.add_argument("--eps", type=_radius, nargs="+", default=[],
                     help="attack radii (inputs lie in [0, 1]); a fraction such as 8/255 is read as its value")
    rob.add_argument("--attack", choices=("fgsm", "pgd"), default="pgd", help="fgsm (one step) or pgd (default)")
    rob.add_argument("--norm", choices=("linf", "l2"), default="linf", help="the ball (default linf; fgsm: linf)")
    rob.add_argument("--steps", type=_flag_type("inner_steps"), default=10, help="pgd steps (default 10)")
    rob.add_argument("--step-size", type=_flag_type("inner_lr"), help="pgd step size (default 2.5 * eps / steps)")
    rob.add_argument("--target", choices=TARGETS, nargs="+", default=["query"],
                     help="where the attacker stands: query (the queries, after adaptation; default), support (the "
                     "support set, poisoned through adaptation, clean queries) or both; several: each in turn")
    rob.add_argument("--random-start", action=argparse.BooleanOptionalAction,
                     help="start from a random point of the ball (default: pgd yes, fgsm no)")
    rob.add_argument("--label-noise", nargs="+", default=[], metavar="KIND:RATE",
                     help=f"support-set label noise, {', '.join(NOISE_KINDS)} at a rate (symmetric:0.4), or all (every "
                     "kind at every rate the shots allow with the true class keeping a plurality)")
    rob.add_argument("--corruption", nargs="+", default=[], metavar="NAME:SEVERITY",
                     help=f"input corruptions at severity 1-5 (NAME:all for the five, all for every one): "
                     f"{', '.join(sorted(CORRUPTIONS))}")
    rob.add_argument("--corrupt", choices=WHERE, default="both", help="which inputs corruptions reach: support, "
                     "query or both (default; support-query shift: one of the two)")
    rob.add_argument("--episodes", type=_flag_type("eval_episodes"), default=1000, help="test episodes (default 1000)")
    _add_key_flag(rob, "dataset", "attack on this dataset's test split instead (cross-domain)")
    for key in ("ways", "shots"):
        _add_key_flag(rob, key, f"{Config.model_fields[key].description} (default: the run's)")
    rob.add_argument("--queries", type=_flag_type("eval_queries"), help="query examples per class (default: the run's)")
    rob.add_argument("--inner-steps", type=_flag_type("inner_steps"), help="inner steps at test time (default: the run's)")
    rob.add_argument("--aggregation", choices=get_args(key_kind("aggregation")),
                     help="protonet runs: prototypes by this aggregation instead of the run's (median, trimmed-mean, "
                     "weighted: robust to label noise)")
    for key in ("device", "threads"):
        _add_key_flag(rob, key, f"{Config.model_fields[key].description} (default: the run's)")

    rep = commands.add_parser("report", help="plots and a Markdown table comparing runs")
    rep.add_argument("run_dirs", type=Path, nargs="+")
    rep.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: report/)")
    return parser


def _run_config(args: argparse.Namespace) -> Config:
    """`fastadapt run`'s config: the built-in recipe, then the flags set."""
    return run_recipe({key: value for key, value in vars(args).items()
                       if key in Config.model_fields and value is not None})


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
    if results["metric"] == "mse" and "loss_before" in results["metrics"]:
        before, after = results["metrics"]["loss_before"], results["metrics"]["loss"]
        loss = "nll" if "mse" in results["metrics"] else "mse"  # a Gaussian output's loss is its NLL
        print(f"pre-adaptation {loss} {before['mean']:.4f} +- {before['ci95']:.4f}  ->  post-adaptation {loss} "
              f"{after['mean']:.4f} +- {after['ci95']:.4f}  (95% CI, {results['episodes']} test episodes)")
    print(f"test {results['metric']}: {results['mean']:.4f} +- {results['ci95']:.4f} (95% CI over "
          f"{results['episodes']} episodes)  wall time {results['wall_time_s']:.1f} s  -> {run_dir / 'results.json'}")


def _train(config: Config | None, run_dir: Path, resume: bool, device: str | None = None,
           threads: int | None = None, task_workers: int | None = None, data_workers: int | None = None) -> None:
    shown = run_config(run_dir) if resume else config
    assert shown is not None
    print(f"fastadapt {__version__}: {shown.algorithm} on {shown.dataset} "
          + (f"({shown.ways}-way {shown.shots}-shot)" if shown.task == "classification" else f"({shown.shots} shots)")
          + f"  -> {run_dir}", flush=True)
    interactive = sys.stderr.isatty()
    results = train(config, run_dir, resume=resume, device=device, threads=threads, task_workers=task_workers,
                    data_workers=data_workers,
                    progress=interactive, on_row=None if interactive else _printer(shown))
    _summary(results, run_dir)


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "run":
        config = _run_config(args)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return
        _train(config, args.out or Path("runs") / time.strftime("run-%Y%m%d-%H%M%S"), resume=False)
    elif args.command == "train":
        if args.resume is not None:
            if args.recipe is not None or args.overrides:
                raise ConfigError("--resume continues a run with its own config: give no recipe or --set")
            _train(None, args.resume, resume=True, device=args.device, threads=args.threads,
                   task_workers=args.task_workers, data_workers=args.data_workers)
            return
        if args.recipe is None:
            raise ConfigError("train needs a RECIPE (a YAML file, see recipes/) or --resume RUN_DIR")
        config = resolve_config(args.recipe, parse_overrides(args.overrides))
        _train(config, args.out or default_run_dir(config), resume=False, device=args.device, threads=args.threads,
               task_workers=args.task_workers, data_workers=args.data_workers)
    elif args.command == "eval":
        for steps in args.inner_steps or [None]:
            result = evaluate(args.run_dir, episodes=args.episodes, ways=args.ways, shots=args.shots,
                              queries=args.queries, inner_steps=steps, device=args.device, ensemble=args.ensemble,
                              threads=args.threads, imaml_lambda=args.imaml_lambda, task_workers=args.task_workers,
                              dataset=args.dataset, calibrated=args.calibrated, members=args.members,
                              samples=args.samples)
            ways = f"{result['ways']}-way " if result["metric"] == "accuracy" else ""
            label = f"{ways}{result['shots']}-shot" + (
                f", {result['inner_steps']} inner step{'s' if result['inner_steps'] != 1 else ''}" if result["inner_steps"] else "") + (
                f", lambda {result['imaml_lambda']:g}" if "imaml_lambda" in result else "") + (
                f", ensemble of the {args.ensemble} best checkpoints" if args.ensemble > 1 else "") + (
                f", deep ensemble of {1 + len(args.members)} runs" if args.members else "")
            where = f" on {result['dataset']}" if result["dataset"] != result["trained_on"] else ""
            print(f"{label}{where}: {result['metric']} {result['mean']:.4f} +- {result['ci95']:.4f} "
                  f"(95% CI over {result['episodes']} episodes)")
            if "ece" in result["metrics"]:
                scaled = f", temperature {result['temperature']:.3f}" if result.get("temperature") else ""
                print("  calibration" + scaled + ": " + ", ".join(
                    f"{name} {result['metrics'][name]['mean']:.4f} +- {result['metrics'][name]['ci95']:.4f}"
                    for name in ("ece", "mce", "adaptive_ece", "loss", "brier")).replace("loss", "nll"))
            if "uncalibrated" in result:
                print("  before scaling: " + ", ".join(
                    f"{name} {result['uncalibrated'][name]['mean']:.4f} +- {result['uncalibrated'][name]['ci95']:.4f}"
                    for name in ("ece", "mce", "adaptive_ece", "loss", "brier")).replace("loss", "nll"))
            if "picp90" in result["metrics"]:
                print("  uncertainty: " + ", ".join(
                    f"{label} {result['metrics'][name]['mean']:.4f} +- {result['metrics'][name]['ci95']:.4f}"
                    for name, label in (("loss", "nll"), ("crps", "crps"), ("picp50", "50% coverage"),
                                        ("picp90", "90% coverage"), ("picp95", "95% coverage"),
                                        ("quantile_ce", "quantile calibration error"))))
    elif args.command == "ood":
        found = detect_ood(args.run_dir, against=args.against, episodes=args.episodes, inner_steps=args.inner_steps,
                           calibrated=args.calibrated, members=args.members, device=args.device, threads=args.threads)
        e = found["entropy"]
        print(f"{found['dataset']} vs {found['against']} tasks, {found['episodes']} each: AUROC {found['auroc']:.4f} +- "
              f"{found['ci95']:.4f} (mean predictive entropy {e['in']['mean']:.4f} vs {e['out']['mean']:.4f})")
    elif args.command == "calibrate":
        fitted = calibrate(args.run_dir, episodes=args.episodes, ways=args.ways, shots=args.shots, queries=args.queries,
                           inner_steps=args.inner_steps, ensemble=args.ensemble, device=args.device, threads=args.threads,
                           members=args.members)
        v = fitted["validation"]
        print(f"temperature {fitted['temperature']:.4f} fitted on {fitted['episodes']} validation episodes: "
              f"NLL {v['nll_before']:.4f} -> {v['nll_after']:.4f}, ECE {v['ece_before']:.4f} -> {v['ece_after']:.4f}")
    elif args.command == "robustness":
        _robustness(args)
    elif args.command == "report":
        from .training.report import write_report

        files = write_report(args.run_dirs, args.out)
        print(f"report written to {args.out}: " + ", ".join(str(p.name) for p in files.paths))


def _add_episode_flags(parser: argparse.ArgumentParser) -> None:
    """--ways, --shots and --queries of the episodes a command evaluates on (default: the run's)."""
    for key in ("ways", "shots"):
        _add_key_flag(parser, key, f"{Config.model_fields[key].description} (default: the run's)")
    parser.add_argument("--queries", type=_flag_type("eval_queries"), help="query examples per class (default: the run's)")


def _radius(text: str) -> float:
    """An argparse type: an attack radius, a finite number >= 0, or a fraction of it (`8/255`)."""
    numerator, slash, denominator = text.partition("/")
    try:
        value = float(numerator) / float(denominator) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _robustness(args: argparse.Namespace) -> None:
    if not (args.eps or args.label_noise or args.corruption):
        raise ConfigError("robustness needs a condition: --eps (an attack), --label-noise or --corruption")
    if args.attack == "fgsm" and (args.norm != "linf" or args.steps != 10 or args.step_size is not None):
        raise ConfigError("--attack fgsm is one L-inf step of eps (1.25 eps from a random start): it takes no --norm, "
                          "--steps or --step-size")
    attack = (fgsm(0.0, random_start=bool(args.random_start)) if args.attack == "fgsm" else
              pgd(0.0, norm=args.norm, steps=args.steps, step_size=args.step_size,
                  random_start=True if args.random_start is None else args.random_start))
    config = run_config(args.run_dir)
    result = evaluate_robustness(args.run_dir, attack=attack if args.eps else None, eps=args.eps, targets=args.target,
                                 label_noise=_noise_conditions(args.label_noise, args.shots or config.shots,
                                                               args.ways or config.ways),
                                 corruptions=_corruption_conditions(args.corruption), corrupt=args.corrupt,
                                 episodes=args.episodes, ways=args.ways, shots=args.shots, queries=args.queries,
                                 inner_steps=args.inner_steps, dataset=args.dataset, aggregation=args.aggregation,
                                 device=args.device,
                                 threads=args.threads)
    where = f" on {result['dataset']}" if result["dataset"] != result["trained_on"] else ""
    print(f"{result['ways']}-way {result['shots']}-shot{where}, {result['episodes']} episodes, accuracy (95% CI):")
    for condition in result["conditions"]:
        accuracy = condition["metrics"]["accuracy"]
        label = condition_label(condition) + (f" ({args.attack} {attack.norm})"
                                              if condition["condition"] == "attack" else "")
        print(f"  {label:<44} {accuracy['mean']:.4f} +- {accuracy['ci95']:.4f}")


def _noise_conditions(specs: Sequence[str], shots: int, ways: int) -> list[tuple[str, float]]:
    """`KIND:RATE` or `all` -> (kind, rate) pairs; each checked for the run's shots and ways."""
    out: list[tuple[str, float]] = []
    for spec in specs:
        if spec == "all":
            pairs = [(kind, rate) for kind in NOISE_KINDS for rate in allowed_rates(kind, shots, ways)]
            if not pairs:
                raise ConfigError(f"--label-noise all: {shots}-shot support sets allow no label noise with the true "
                                  "class keeping a plurality (--shots 3 or more)")
            out += pairs
            continue
        kind, _, text = spec.partition(":")
        try:
            rate = float(text)
        except ValueError:
            raise ConfigError(f"--label-noise expects KIND:RATE (e.g. symmetric:0.4) or all, got {spec!r}") from None
        if kind not in NOISE_KINDS:
            raise ConfigError(f"--label-noise {spec!r}: the kind must be one of {', '.join(NOISE_KINDS)}")
        try:
            noisy_per_class(rate, shots, kind, ways)
        except ValueError as error:
            raise ConfigError(f"--label-noise {spec!r}: {error}") from None
        out.append((kind, rate))
    return out


def _corruption_conditions(specs: Sequence[str]) -> list[tuple[str, int]]:
    """`NAME:SEVERITY`, `NAME:all` or `all` -> (name, severity) pairs."""
    out: list[tuple[str, int]] = []
    for spec in specs:
        if spec == "all":
            out += [(name, severity) for name in sorted(CORRUPTIONS) for severity in SEVERITIES]
            continue
        name, _, text = spec.partition(":")
        if name not in CORRUPTIONS:
            raise ConfigError(f"--corruption {spec!r}: unknown corruption {name!r}; known: {', '.join(sorted(CORRUPTIONS))}")
        if text == "all":
            out += [(name, severity) for severity in SEVERITIES]
        elif text.isdigit() and int(text) in SEVERITIES:
            out.append((name, int(text)))
        else:
            raise ConfigError(f"--corruption expects NAME:SEVERITY with a severity 1-5, NAME:all or all, got {spec!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # a training process reuses the same large blocks: see fastadapt.runtime
    try:
        _dispatch(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ImportError, ValueError) as error:
        print(f"fastadapt: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"fastadapt: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
