"""The Python API, mirroring the command line: `fastadapt.train(...)` and `fastadapt.evaluate(...)`."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import Tensor

from .algorithms import Learner
from .io import read_json, write_json
from .runtime import torch_threads
from .training.checkpoint import (CheckpointError, ensemble_checkpoints, latest_checkpoint, load_checkpoint,
                                  load_module_tensors, ranked_validation_steps)
from .training.config import PROBABILISTIC, Config, ConfigError
from .data.sampler import DeviceTasks, TaskSource
from .robust import Attack, NoisyLabels
from .robust.corruptions import WHERE, check_corruption
from .robust.evaluation import TARGETS
from .calibration import expected_calibration_error, fit_temperature, nll_scores, predictive_probs
from .calibration.ood import auroc_ci95, predictive_entropy
from .data.episodes import TaskBatch
from .training.evaluate import (Estimate, collect_over_episodes, ensemble_samples, evaluate_calibration, evaluate_corrupted,
                                evaluate_ensemble, evaluate_learner, evaluate_regression_calibration, evaluate_under_attack,
                                headline_metric, predictive_bands)
from .training.experiment import build_learner, test_source, validation_source
from .training.recipes import load_recipe, saved_config
from .training.trainer import Trainer

__all__ = ["train", "evaluate", "calibrate", "detect_ood", "evaluate_robustness", "load", "resolve_config", "run_config", "default_run_dir"]

PathLike = str | os.PathLike[str]


def resolve_config(config: Config | Mapping[str, Any] | PathLike, overrides: Mapping[str, Any] | None = None) -> Config:
    """A `Config` from a config, a mapping of keys, or a recipe path; `overrides` win."""
    if isinstance(config, Config):
        return config.replace(**overrides) if overrides else config
    if isinstance(config, Mapping):
        return Config.from_dict({**config, **(overrides or {})})
    return load_recipe(config, overrides)


def default_run_dir(config: Config) -> Path:
    name = config.name or f"{config.algorithm}-{config.dataset}-{config.ways}w{config.shots}s-seed{config.seed}"
    return Path("runs") / name


def run_config(run_dir: PathLike) -> Config:
    """The config a run directory was made with."""
    saved = Path(run_dir) / "config.json"
    if not saved.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory: config.json is missing")
    try:
        values = read_json(saved)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{saved} is truncated or not JSON ({error}); it is the run's config: restore it "
                              "from a copy, or start the run again in a new folder") from None
    return saved_config(values, saved)


def train(config: Config | Mapping[str, Any] | PathLike | None = None, out: PathLike | None = None, *,
          resume: bool = False, overrides: Mapping[str, Any] | None = None, device: str | None = None,
          threads: int | None = None, task_workers: int | None = None, data_workers: int | None = None,
          progress: bool = True,
          on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Meta-trains and tests one config in a run directory; returns what `results.json` holds.

    `resume=True` continues the run in `out` from its newest valid checkpoint, with its own config.
    `device` (cpu, cuda, cuda:N), `threads` (torch's intra-op threads), `task_workers` (task
    groups at once) and `data_workers` (processes drawing task batches) override where and on how
    many threads and processes the run trains, a resumed one included (none changes what it
    computes, beyond rounding).
    `progress` shows a progress bar; `on_row` receives every logged metrics row.

    Example:
        >>> import fastadapt
        >>> results = fastadapt.train({"iterations": 50, "eval_episodes": 20}, "/tmp/run", progress=False)  # doctest: +SKIP
        >>> results["metric"], results["episodes"]  # doctest: +SKIP
        ('mse', 20)
    """
    if resume:
        if out is None:
            raise ConfigError("resume needs the run directory (out=...)")
        resolved = run_config(out)
    else:
        if config is None:
            raise ConfigError("train needs a config, a mapping of config keys, or a recipe path")
        resolved = resolve_config(config, overrides)
    if device is not None:
        resolved = resolved.replace(device=device)
    if threads is not None:
        resolved = resolved.replace(threads=threads)
    if task_workers is not None:
        resolved = resolved.replace(task_workers=task_workers)
    if data_workers is not None:
        resolved = resolved.replace(data_workers=data_workers)
    run_dir = Path(out) if out is not None else default_run_dir(resolved)
    return Trainer(resolved, run_dir, progress=progress, on_row=on_row).fit(resume=resume)


def evaluate(run_dir: PathLike, *, episodes: int = 1000, ways: int | None = None, shots: int | None = None,
             queries: int | None = None, inner_steps: int | None = None, device: str | None = None,
             ensemble: int = 1, threads: int | None = None, imaml_lambda: float | None = None,
             task_workers: int | None = None, dataset: str | None = None, calibrated: bool = False,
             members: Sequence[PathLike] = (), samples: int | None = None) -> dict[str, Any]:
    """Evaluates a trained run (its best checkpoint, else its newest) on fixed test episodes, on
    `device` with `threads` torch threads and `task_workers` episode batches at once (default: the
    run's own; see `evaluate_learner`). With `ensemble=K`, the mean
    output of its K best validated checkpoints instead (MAML++'s protocol with K=5; the run must
    have kept them: `keep_best: K`).

    Other ways / shots / inner steps than in training are allowed where the model permits (a MAML
    head has `ways` outputs; ProtoNet takes any). `imaml_lambda`: an iMAML run's proximal strength
    at test time (default: the run's `eval_imaml_lambda`, else its `imaml_lambda`; 0 is the authors'
    plain fine-tuning). `dataset`: test on another dataset's test split (cross-domain, e.g. an
    Omniglot run on "mnist"; the inputs must have the shape the model takes).

    A classifier is scored on its predictive probabilities (the mean over a Bayesian learner's
    samples or an ensemble's members): accuracy, NLL (`loss`), Brier, and the calibration errors
    ECE, MCE and adaptive ECE (15 bins, pooled over all queries; `training.evaluate.evaluate_calibration`),
    with the reliability diagram's bins. `calibrated=True` divides the logits by the temperature
    `calibrate` fitted on validation episodes at the same ways / shots / queries / inner steps (the
    same predictions' uncalibrated metrics in `uncalibrated`). A regression run with a Gaussian output (`likelihood: gaussian`) is scored on its predictive
    mixture: NLL (`loss`), MSE, CRPS, interval coverage at 50/90/95% and the quantile calibration
    error, with the PIT histogram and the predictive samples of four episodes (`bands`, for plots). `members`: other runs of the same algorithm, dataset, backbone and ways (other seeds): a deep
    ensemble of this run and them, their probabilities averaged (each member's best checkpoint).
    `samples`: a VAMPIRE or PLATIPUS run's weight samples per episode (default: its `eval_samples`).
    Writes `RUN_DIR/evals/<...>.json` and returns it.

    Example:
        >>> fastadapt.evaluate("runs/protonet-omniglot", shots=5, episodes=1000)["mean"]  # doctest: +SKIP
        0.99...
    """
    run_dir = Path(run_dir)
    config = _evaluation_config(run_dir, episodes, device=device, threads=threads, task_workers=task_workers)
    if imaml_lambda is not None:
        if config.algorithm != "imaml":
            raise ConfigError(f"imaml_lambda applies to iMAML runs; {run_dir} is a {config.algorithm} run")
        config = config.replace(eval_imaml_lambda=imaml_lambda)
    _check_ways(config, ways)
    if ensemble < 1:
        raise ConfigError(f"ensemble must be >= 1 (how many of the best validated checkpoints), got {ensemble}")
    own_samples = config.effective_eval_samples
    if samples is not None:
        if config.algorithm not in ("vampire", "platipus"):
            raise ConfigError(f"samples applies to vampire and platipus runs (weight samples per episode); {run_dir} is "
                              f"a {config.algorithm} run" + (" (its particles are its samples)" if config.algorithm == "bmaml" else ""))
        config = config.replace(eval_samples=samples)
    checkpoints = _evaluated_checkpoints(run_dir, ensemble)
    learners = [_restored(config, tensors, source) for tensors, source in checkpoints]
    learners += _member_learners(config, members, device=device, threads=threads)
    steps = inner_steps or config.effective_eval_inner_steps
    adapts = config.algorithm not in ("protonet", "baseline", "matchingnet")
    temperature = (_fitted_temperature(run_dir, config, ways, shots, queries, steps if adapts else None, ensemble,
                                       members) if calibrated else None)
    tasks = test_source(config, ways, shots, queries, dataset=dataset)
    extra: dict[str, Any] = {}
    with torch_threads(config.threads):  # the run's own thread count, as in training
        if config.task == "classification":
            summary = evaluate_calibration(learners, tasks, episodes, inner_steps=steps, also_uncalibrated=calibrated,
                                           temperature=1.0 if temperature is None else temperature["temperature"])
            estimates = {k: Estimate(mean, ci, summary.episodes) for k, (mean, ci) in summary.estimates.items()}
            extra = {"temperature": None if temperature is None else temperature["temperature"], **summary.extra}
        elif config.learner_task == "gaussian":
            summary = evaluate_regression_calibration(learners, tasks, episodes, inner_steps=steps)
            estimates = {k: Estimate(mean, ci, summary.episodes) for k, (mean, ci) in summary.estimates.items()}
            extra = {**summary.extra, "bands": predictive_bands(learners, tasks, inner_steps=steps)}
        else:
            estimates = (evaluate_learner(learners[0], tasks, episodes, inner_steps=steps) if len(learners) == 1
                         else evaluate_ensemble(learners, tasks, episodes, inner_steps=steps))
    metric = headline_metric(estimates)
    imaml_test_lambda = config.effective_eval_imaml_lambda if config.algorithm == "imaml" else None
    ways, shots, queries = ways or config.ways, shots or config.shots, queries or config.eval_queries
    result = {
        "dataset": dataset or config.dataset, "trained_on": config.dataset, "ways": ways, "shots": shots, "queries": queries,
        "inner_steps": steps if adapts else None,
        **({"imaml_lambda": imaml_test_lambda} if imaml_test_lambda is not None else {}),
        "episodes": episodes, "metric": metric if metric == "accuracy" else "mse", "device": config.device,
        "mean": estimates[metric].mean, "ci95": estimates[metric].ci95,
        "ensemble": ensemble, "checkpoints": [path.name for _, path in checkpoints],
        **({"members": [str(m) for m in members]} if members else {}),
        **({"samples": config.effective_eval_samples} if config.algorithm in PROBABILISTIC else {}),
        "metrics": {k: {"mean": e.mean, "ci95": e.ci95} for k, e in estimates.items()}, **extra,
    }
    other_queries = f"-{queries}q" if queries != config.eval_queries else ""  # the run's own: the older name
    top = f"-top{ensemble}" if ensemble > 1 else ""
    other_lambda = (f"-lambda{imaml_test_lambda:g}" if imaml_test_lambda is not None
                    and imaml_test_lambda != config.imaml_lambda else "")
    other_samples = f"-{samples}samples" if samples is not None and samples != own_samples else ""
    tag = (f"{_file_name(dataset or config.dataset)}-{ways}w{shots}s{other_queries}-{result['inner_steps'] or 0}steps{other_lambda}"
           f"{other_samples}-{episodes}ep{top}{_members_tag(members)}{'-calibrated' if calibrated else ''}")
    write_json(run_dir / "evals" / f"{tag}.json", result)
    return result


def calibrate(run_dir: PathLike, *, episodes: int = 500, ways: int | None = None, shots: int | None = None,
              queries: int | None = None, inner_steps: int | None = None, ensemble: int = 1, device: str | None = None,
              threads: int | None = None, members: Sequence[PathLike] = ()) -> dict[str, Any]:
    """Fits the temperature of a trained classification run (its best checkpoint, or the mean of its
    `ensemble` best) on `episodes` validation episodes, never on test ones, at the run's ways /
    shots / queries / evaluation inner steps or those given, and stores it in
    `RUN_DIR/calibration/temperature-<setting>.json` with the validation NLL and ECE before and
    after; `evaluate(..., calibrated=True)` at the same setting applies it. The run needs a
    validation split (`validation_characters` > 0 on Omniglot). `members`: as in `evaluate`.

    Example:
        >>> fastadapt.calibrate("runs/maml-omniglot")["temperature"]  # doctest: +SKIP
        1.6...
    """
    run_dir = Path(run_dir)
    config = _evaluation_config(run_dir, episodes, device=device, threads=threads)
    if config.task != "classification":
        raise ConfigError(f"temperature scaling calibrates class probabilities; {run_dir} is a {config.task} run")
    _check_ways(config, ways)
    if ensemble < 1:
        raise ConfigError(f"ensemble must be >= 1 (how many of the best validated checkpoints), got {ensemble}")
    learners = [_restored(config, tensors, source) for tensors, source in _evaluated_checkpoints(run_dir, ensemble)]
    learners += _member_learners(config, members, device=device, threads=threads)
    adapts = config.algorithm not in ("protonet", "baseline", "matchingnet")
    steps = inner_steps or config.effective_eval_inner_steps
    tasks = validation_source(config, ways, shots, queries)
    with torch_threads(config.threads):
        collected = collect_over_episodes(
            lambda batch, start: {"samples": ensemble_samples(learners, batch, steps), "labels": batch.query_y},
            tasks, episodes, 32, learners)
    samples = collected["samples"].flatten(0, 1).cpu().double()
    labels = collected["labels"].flatten().cpu()
    temperature = fit_temperature(samples, labels)
    before, after = predictive_probs(samples), predictive_probs(samples, temperature)
    ways, shots, queries = ways or config.ways, shots or config.shots, queries or config.eval_queries
    result = {
        "temperature": temperature, "split": "validation", "episodes": episodes, "eval_seed": config.eval_seed,
        "ways": ways, "shots": shots, "queries": queries, "inner_steps": steps if adapts else None,
        "ensemble": ensemble, **({"members": [str(m) for m in members]} if members else {}), "validation": {
            "nll_before": float(nll_scores(before, labels).mean()), "nll_after": float(nll_scores(after, labels).mean()),
            "ece_before": float(expected_calibration_error(before, labels)),
            "ece_after": float(expected_calibration_error(after, labels))},
    }
    write_json(_temperature_path(run_dir, ways, shots, queries, result["inner_steps"], ensemble, members), result)
    return result


def detect_ood(run_dir: PathLike, *, against: str = "mnist", episodes: int = 500, inner_steps: int | None = None,
               calibrated: bool = False, members: Sequence[PathLike] = (), device: str | None = None,
               threads: int | None = None) -> dict[str, Any]:
    """How well a trained classification run tells test tasks of another dataset (`against`, e.g.
    "mnist" for an Omniglot run) from its own test tasks by its uncertainty: each task's mean
    predictive entropy over its queries (`calibration.ood`), `episodes` tasks of each, and the
    AUROC of that score (1: separated, 0.5: chance) with a bootstrap 95% interval. `calibrated`,
    `members`: as in `evaluate`. Writes `RUN_DIR/ood/<against>-<...>.json` and returns it.

    Example:
        >>> fastadapt.detect_ood("runs/maml-omniglot", against="mnist")["auroc"]  # doctest: +SKIP
        0.8...
    """
    run_dir = Path(run_dir)
    config = _evaluation_config(run_dir, episodes, device=device, threads=threads)
    if config.task != "classification":
        raise ConfigError(f"out-of-distribution detection scores class probabilities; {run_dir} is a {config.task} run")
    learners = [_restored(config, *_evaluated_checkpoints(run_dir, 1)[0])]
    learners += _member_learners(config, members, device=device, threads=threads)
    adapts = config.algorithm not in ("protonet", "baseline", "matchingnet")
    steps = inner_steps or config.effective_eval_inner_steps
    temperature = (_fitted_temperature(run_dir, config, None, None, None, steps if adapts else None, 1, members)
                   ["temperature"] if calibrated else 1.0)

    def entropy(batch: TaskBatch, start: int) -> dict[str, Tensor]:
        probs = predictive_probs(ensemble_samples(learners, batch, steps), temperature)
        return {"entropy": predictive_entropy(probs).mean(1).cpu()}

    scores = {}
    with torch_threads(config.threads):
        for name, source in (("in", test_source(config)), ("out", test_source(config, dataset=against))):
            scores[name] = collect_over_episodes(entropy, source, episodes, 32, learners)["entropy"]
    value, ci95 = auroc_ci95(scores["in"], scores["out"])
    result = {"dataset": config.dataset, "against": against, "episodes": episodes, "ways": config.ways,
              "shots": config.shots, "queries": config.eval_queries, "inner_steps": steps if adapts else None,
              "temperature": temperature if calibrated else None,
              **({"members": [str(m) for m in members]} if members else {}),
              "score": "mean predictive entropy of the queries", "auroc": value, "ci95": ci95,
              "entropy": {name: {"mean": float(v.mean()), "std": float(v.std())} for name, v in scores.items()}}
    tag = f"{_file_name(against)}-{episodes}ep{_members_tag(members)}{'-calibrated' if calibrated else ''}"
    write_json(run_dir / "ood" / f"{tag}.json", result)
    return result


def _member_learners(config: Config, members: Sequence[PathLike], **execution: Any) -> list[Learner]:
    """The best-checkpoint learners of other runs joining `config`'s run in a deep ensemble;
    refused, naming the key, where one differs in what an ensemble needs to share."""
    learners = []
    for member in members:
        theirs = _evaluation_config(Path(member), **execution)
        differ = [k for k in ("algorithm", "dataset", "backbone", "ways", "image_size", "channels")
                  if getattr(theirs, k) != getattr(config, k)]
        if differ:
            raise ConfigError(f"ensemble member {member} differs from the run in {', '.join(differ)} "
                              f"({', '.join(f'{k}: {getattr(theirs, k)!r} vs {getattr(config, k)!r}' for k in differ)}); "
                              "members must share the algorithm, dataset, backbone and ways (other seeds)")
        learners.append(_restored(theirs, *_evaluated_checkpoints(Path(member), 1)[0]))
    return learners


def _members_tag(members: Sequence[PathLike]) -> str:
    """`-members<K>-<digest of their paths>` in file names of deep-ensemble results ('' without)."""
    if not members:
        return ""
    return f"-members{len(members)}-{hashlib.sha1(json.dumps([str(m) for m in members]).encode()).hexdigest()[:6]}"


def _temperature_path(run_dir: Path, ways: int, shots: int, queries: int, steps: int | None, ensemble: int,
                      members: Sequence[PathLike] = ()) -> Path:
    top = f"-top{ensemble}" if ensemble > 1 else ""
    return run_dir / "calibration" / f"temperature-{ways}w{shots}s-{queries}q-{steps or 0}steps{top}{_members_tag(members)}.json"


def _fitted_temperature(run_dir: Path, config: Config, ways: int | None, shots: int | None, queries: int | None,
                        steps: int | None, ensemble: int, members: Sequence[PathLike] = ()) -> dict[str, Any]:
    """The temperature `calibrate` stored for this setting, or a ConfigError naming the command."""
    ways, shots, queries = ways or config.ways, shots or config.shots, queries or config.eval_queries
    path = _temperature_path(run_dir, ways, shots, queries, steps, ensemble, members)
    if not path.is_file():
        flags = "".join(f" --{name} {value}" for name, value, own in (
            ("ways", ways, config.ways), ("shots", shots, config.shots), ("queries", queries, config.eval_queries),
            ("inner-steps", steps, config.effective_eval_inner_steps), ("ensemble", ensemble, 1))
            if value is not None and value != own) + "".join(f" --members {' '.join(map(str, members))}" if members else "")
        raise ConfigError(f"no temperature was fitted for {run_dir} at {ways}-way {shots}-shot, {queries} queries"
                          f"{f', {steps} inner steps' if steps else ''}{f', ensemble of {ensemble}' if ensemble > 1 else ''}"
                          f" ({path} is missing): fit one on validation episodes first with "
                          f"`fastadapt calibrate {run_dir}{flags}`")
    return read_json(path)


def evaluate_robustness(run_dir: PathLike, *, attack: Attack | None = None, eps: Sequence[float] = (),
                        targets: Sequence[str] = ("query",), label_noise: Sequence[tuple[str, float]] = (),
                        corruptions: Sequence[tuple[str, int]] = (),
                        corrupt: str = "both", episodes: int = 1000, ways: int | None = None, shots: int | None = None,
                        queries: int | None = None, inner_steps: int | None = None, dataset: str | None = None,
                        aggregation: str | None = None, device: str | None = None, threads: int | None = None
                        ) -> dict[str, Any]:
    """A trained classification run (its best checkpoint, else its newest) on fixed test episodes
    under each condition, one at a time, after the clean evaluation: `attack` at each radius in
    `eps` with the attacker at each of `targets` ("query": the predictor adapted to the clean support
    set is attacked on the queries; "support": the support set is poisoned through adaptation;
    "both"; `robust.attacked_task_metrics`), each `(kind, rate)` of `label_noise` in the support sets (`robust.NoisyLabels`), each `(name,
    severity)` of `corruptions` on the support set, the query set or both (`corrupt`). Other ways /
    shots / queries / inner steps / `dataset` as in `evaluate`; a ProtoNet run's prototypes by
    another `aggregation` (median, trimmed-mean, weighted: robust to label noise). Writes
    `RUN_DIR/robustness/<...>.json` and returns it (also `fastadapt.robust.evaluate`).

    Example:
        >>> from fastadapt.robust import pgd
        >>> result = fastadapt.robust.evaluate("runs/maml-omniglot", attack=pgd(0.0), eps=[0.05, 0.1])  # doctest: +SKIP
        >>> [c["metrics"]["accuracy"]["mean"] for c in result["conditions"]]  # doctest: +SKIP
        [0.95..., 0.6..., 0.2...]
    """
    run_dir = Path(run_dir)
    config = _evaluation_config(run_dir, episodes, device=device, threads=threads)
    if aggregation is not None:
        config = config.replace(aggregation=aggregation)
    if config.task != "classification":
        raise ConfigError(f"robustness evaluates classification runs; {run_dir} is a {config.task} run on "
                          f"{config.dataset!r}")
    _check_ways(config, ways)
    if eps and attack is None:
        raise ConfigError("eps needs an attack (attack=pgd(...) or fgsm(...); --attack)")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ConfigError(f"targets must be some of {', '.join(TARGETS)}, got {list(targets)!r}")
    for radius in eps:
        if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius >= 0):
            raise ConfigError(f"eps must be finite numbers >= 0, got {radius!r}")
    for name, severity in corruptions:
        try:
            check_corruption(name, severity)
        except ValueError as error:
            raise ConfigError(f"corruption {name}:{severity}: {error}") from None
    if corrupt not in WHERE:
        raise ConfigError(f"corrupt must be one of {', '.join(WHERE)}, got {corrupt!r}")
    learner = _restored(config, *_evaluated_checkpoints(run_dir, 1)[0])
    steps = inner_steps or config.effective_eval_inner_steps
    tasks = test_source(config, ways, shots, queries, dataset=dataset)
    runs: list[tuple[dict[str, Any], Callable[[], dict[str, Estimate]]]] = [
        ({"condition": "clean"}, lambda: evaluate_learner(learner, tasks, episodes, inner_steps=steps))]
    for target in dict.fromkeys(targets):
        for radius in sorted({float(e) for e in eps} - {0.0}):
            runs.append(({"condition": "attack", "eps": radius, "target": target},
                         lambda r=radius, t=target: evaluate_under_attack(
                             learner, tasks, dataclasses.replace(attack, eps=r), episodes, inner_steps=steps, target=t)))
    for kind, rate in label_noise:
        noisy = _noisy(tasks, kind, rate)
        runs.append(({"condition": "label_noise", "kind": kind, "rate": rate},
                     lambda source=noisy: evaluate_learner(learner, source, episodes, inner_steps=steps)))
    for name, severity in corruptions:
        runs.append(({"condition": "corruption", "name": name, "severity": severity, "where": corrupt},
                     lambda n=name, v=severity: evaluate_corrupted(learner, tasks, n, v, corrupt, episodes,
                                                                   inner_steps=steps)))
    conditions = []
    with torch_threads(config.threads):
        for condition, measure in runs:
            estimates = measure()
            conditions.append({**condition, "metrics": {k: {"mean": e.mean, "ci95": e.ci95} for k, e in estimates.items()}})
    ways, shots, queries = ways or config.ways, shots or config.shots, queries or config.eval_queries
    result = {
        "dataset": dataset or config.dataset, "trained_on": config.dataset, "ways": ways, "shots": shots,
        "queries": queries, "episodes": episodes, "eval_seed": config.eval_seed,
        "inner_steps": None if config.algorithm in ("protonet", "baseline", "matchingnet") else steps,
        **({"aggregation": aggregation} if aggregation is not None else {}),
        "attack": None if attack is None else {
            "kind": "fgsm" if attack.steps == 1 else "pgd", "norm": attack.norm, "steps": attack.steps,
            "step_size": attack.step_size, "random_start": attack.random_start,
            "bounds": list(attack.bounds) if attack.bounds else None},
        "conditions": conditions,
    }
    what = [result["attack"], [c for c, _ in runs], queries, result["inner_steps"], config.eval_seed,
            *([aggregation] if aggregation is not None else [])]
    digest = hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]
    tag = f"{_file_name(dataset or config.dataset)}-{ways}w{shots}s-{episodes}ep-{digest}"
    write_json(run_dir / "robustness" / f"{tag}.json", result)
    return result


def _noisy(tasks: TaskSource, kind: str, rate: float) -> TaskSource:
    """`tasks` with label noise in the support sets (drawn on the CPU, then placed as `tasks` is)."""
    if isinstance(tasks, DeviceTasks):
        return DeviceTasks(_noisy(tasks.source, kind, rate), tasks.device)
    try:
        return NoisyLabels(tasks, kind, rate)  # type: ignore[arg-type]
    except ValueError as error:
        raise ConfigError(f"label noise {kind}:{rate}: {error}") from None


def load(run_dir: PathLike, *, device: str | None = None) -> Learner:
    """The trained learner of a run directory, from its best validated checkpoint, else its newest,
    on `device` (default: the run's), ready for `adapt`, `task_metrics` or `evaluate_learner`.

    Example:
        >>> learner = fastadapt.load("runs/protonet-omniglot")  # doctest: +SKIP
        >>> predictor = learner.adapt(support_x, support_y); predictor(query_x).argmax(1)  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    return _restored(_evaluation_config(run_dir, device=device), *_evaluated_checkpoints(run_dir, 1)[0])


def _restored(config: Config, tensors: dict[str, Tensor], source: Path) -> Learner:
    """A learner built from `config`, its weights and buffers from a checkpoint's tensors."""
    learner = build_learner(config)
    load_module_tensors(learner, tensors, "learner.", source)
    return learner


def _evaluation_config(run_dir: Path, episodes: int | None = None, **execution: Any) -> Config:
    """The run's config with the execution keys given (device, threads, task_workers) in place of
    its own; `episodes`, if given, checked."""
    config = run_config(run_dir)
    changes = {key: value for key, value in execution.items() if value is not None}
    if changes:
        config = config.replace(**changes)
    if episodes is not None and episodes < 2:
        raise ConfigError(f"episodes must be >= 2 for a confidence interval, got {episodes}")
    return config


def _check_ways(config: Config, ways: int | None) -> None:
    """Other ways than in training only where the model has no ways-sized head."""
    if ways is not None and ways != config.ways and config.algorithm not in ("protonet", "baseline", "matchingnet"):
        raise ConfigError(f"{config.algorithm} was trained {config.ways}-way and its head has {config.ways} "
                          f"outputs; it cannot be evaluated {ways}-way (ProtoNet, MatchingNet and Baseline can)")


def _file_name(dataset: str) -> str:
    """A dataset spec as part of a file name (`folder:/a/b` -> `folder-a-b`)."""
    return "-".join(part for part in re.split(r"[^A-Za-z0-9_.+]+", dataset) if part)


def _evaluated_checkpoints(run_dir: Path, ensemble: int) -> list[tuple[dict[str, Tensor], Path]]:
    """The tensors and manifest of the checkpoint an evaluation uses (best, else newest), or of the
    `ensemble` best validated ones."""
    checkpoints = run_dir / "checkpoints"
    if ensemble > 1:
        with open(run_dir / "metrics.csv", newline="") as f:
            ranked = ranked_validation_steps(csv.DictReader(f))
        return [(load_checkpoint(path)[0], path) for path in ensemble_checkpoints(checkpoints, ranked, ensemble)]
    best = checkpoints / "best.json"
    if best.is_file():
        return [(load_checkpoint(best)[0], best)]
    tensors, _, newest = latest_checkpoint(checkpoints)
    return [(tensors, newest)]
