"""The trainer: meta-training with an outer optimizer and schedule, validation, best and periodic
checkpoints with exact resume (bitwise on the CPU; on a GPU as close as cuDNN's kernel choices
allow), a metrics history (CSV), and the final test evaluation.

A run directory holds everything about a run:

    config.json        the resolved config            environment.json  versions, git commit, command, device
    metrics.csv        train / validation rows        results.json      the test result (when finished)
    checkpoints/       step-*.safetensors + .json (the newest two) and best.safetensors + best.json;
                       with `keep_best: K` also top-*.safetensors + .json, the K best validated weights
    tensorboard/       event files, with `tensorboard: true` (needs the `tensorboard` package)
"""

from __future__ import annotations

import csv
import io
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import __version__
from ..data.loading import task_batches
from ..io import atomic_path, write_json
from .checkpoint import (CheckpointError, keep_top_checkpoints, latest_checkpoint, load_checkpoint,
                         load_module_tensors, optimizer_from_tensors, optimizer_to_tensors, prune_checkpoints,
                         ranked_validation_steps, save_checkpoint, step_name)
from .config import EXECUTION_KEYS, Config, ConfigError
from .recipes import saved_config
from .evaluate import Estimate, evaluate_learner, headline_metric
from .experiment import Experiment, build_experiment
from .loop import TrainingDiverged, check_finite_losses

__all__ = ["Trainer", "METRIC_COLUMNS", "learning_rate"]

METRIC_COLUMNS = ("step", "phase", "loss", "accuracy", "lr", "tasks_per_s", "elapsed_s")
_KEEP_CHECKPOINTS = 2
_META_LOSS = "meta_loss"  # the loss back-propagated each step (metrics' `loss` may be a part of it)


def learning_rate(config: Config, step: int) -> float:
    """The outer learning rate at `step` (1-based) under the config's schedule.

    Cosine anneals from `meta_lr` at step 1 towards `min_meta_lr` (0 by default) at the end; linear
    from `meta_lr` at step 1 towards 0 after the last step (Reptile's outer step size, Nichol et al.).

    Example:
        >>> learning_rate(Config(schedule="step", schedule_step=10, schedule_gamma=0.5, meta_lr=1.0), 25)
        0.25
        >>> learning_rate(Config(schedule="cosine", iterations=10, meta_lr=1.0, min_meta_lr=0.5), 6)
        0.75
        >>> learning_rate(Config(schedule="linear", iterations=10, meta_lr=1.0), 6)
        0.5
    """
    if config.schedule == "cosine":
        span = config.meta_lr - config.min_meta_lr
        return config.min_meta_lr + span * 0.5 * (1 + math.cos(math.pi * (step - 1) / config.iterations))
    if config.schedule == "step":
        return config.meta_lr * config.schedule_gamma ** ((step - 1) // config.schedule_step)
    if config.schedule == "linear":
        return config.meta_lr * (1 - (step - 1) / config.iterations)
    return config.meta_lr


def _optimizer(config: Config, parameters: Any) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        # Reptile's outer step is the plain interpolation theta += lr * (mean phi - theta): no momentum unless asked.
        default = 0.0 if config.algorithm == "reptile" else 0.9
        return torch.optim.SGD(parameters, lr=config.meta_lr,
                               momentum=default if config.meta_momentum is None else config.meta_momentum)
    return torch.optim.Adam(parameters, lr=config.meta_lr)


def _result_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The config keys a result depends on: all but where and on how many threads and processes it
    runs (`EXECUTION_KEYS`: a run resumes on another device, or with other counts)."""
    return {k: v for k, v in config.items() if k not in EXECUTION_KEYS}


def _git(*args: str) -> str | None:
    """The output of `git ARGS` in the library's checkout; None outside one."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _checkout_state() -> dict[str, Any]:
    """The library's git commit and whether tracked files differ from it (None outside a checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD") or None,
            "git_uncommitted_changes": None if status is None else bool(status)}


class Trainer:
    """Runs one config in one run directory; `fit()` trains (or resumes) and tests.

    Example:
        >>> results = Trainer(Config(iterations=20, eval_episodes=10), Path("/tmp/run")).fit()  # doctest: +SKIP
        >>> results["metric"]  # doctest: +SKIP
        'mse'
    """

    def __init__(self, config: Config, run_dir: Path, *, progress: bool = True,
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        self.progress = progress
        self.on_row = on_row
        self.events: Any = None

    # -- public -------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Meta-trains to `config.iterations` (continuing from the newest checkpoint if `resume`), then tests."""
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        started = time.perf_counter()
        experiment = build_experiment(config)
        learner = experiment.learner
        optimizer = _optimizer(config, learner.parameters())
        state = self._fresh_state() if not resume else self._restore(learner, optimizer)
        if not resume:
            self._start_run_dir()
        if config.tensorboard:
            self.events = self._event_writer(first_step=state["step"] + 1)
        try:
            self._train(experiment, optimizer, state)
        finally:
            if self.events is not None:
                self.events.close()
        if state["best"] is not None:
            tensors, _ = load_checkpoint(self.checkpoints / "best.json")
            load_module_tensors(learner, tensors, "learner.", self.checkpoints / "best.json")
        estimates = evaluate_learner(learner, experiment.test, config.eval_episodes, inner_steps=config.effective_eval_inner_steps)
        results = self._results(estimates, state, time.perf_counter() - started)
        write_json(self.run_dir / "results.json", results)
        return results

    # -- the loop -----------------------------------------------------------------------------
    def _train(self, experiment: Experiment, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        config, learner = self.config, experiment.learner
        window: dict[str, list[Tensor]] = state.pop("window")
        window_start, window_tasks = time.perf_counter(), 0
        bar = self._bar(state["step"])
        # task batch k holds episodes k*meta_batch ... (k+1)*meta_batch-1: the same for any data_workers
        batches = task_batches(experiment.train, config.meta_batch, state["step"], config.iterations - state["step"],
                               config.data_workers)
        try:
            for batch in batches:
                if state["stopped_early"]:
                    break
                step = state["step"] + 1
                lr = learning_rate(config, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss, metrics = learner.meta_loss(batch)
                loss.backward()
                optimizer.step()
                state["step"] = step
                window_tasks += config.meta_batch
                for name, value in {**metrics, _META_LOSS: loss.detach()}.items():
                    window.setdefault(name, []).append(value)
                logs = step % config.log_every == 0 or step == config.iterations
                if logs or step % config.checkpoint_every == 0 or (config.validation_every
                                                                   and step % config.validation_every == 0):
                    self._check_finite(learner, window, step)
                if logs:
                    now = time.perf_counter()
                    state["train_seconds"] += now - window_start
                    row = {name: float(torch.stack(values).mean()) for name, values in window.items()}
                    self._log(state, {"step": step, "phase": "train", "loss": row["loss"],
                                      "accuracy": row.get("accuracy"), "lr": lr,
                                      "tasks_per_s": window_tasks / (now - window_start),
                                      "elapsed_s": state["train_seconds"]}, bar)
                    window.clear()
                    window_tasks = 0
                if config.validation_every and step % config.validation_every == 0:
                    self._validate(experiment, state, bar)
                if step % config.checkpoint_every == 0 or step == config.iterations or state["stopped_early"]:
                    self._checkpoint(learner, optimizer, state, window)
                if bar is not None:
                    bar.update(1)
                window_start = time.perf_counter() if not window else window_start
        finally:
            batches.close()  # stops the workers of a run that ends early
            if bar is not None:
                bar.close()

    def _check_finite(self, learner: nn.Module, window: dict[str, list[Tensor]], step: int) -> None:
        """Before the weights are logged, validated or saved: the window's meta-losses and the
        weights after `step` are finite."""
        check_finite_losses(window.get(_META_LOSS, []), step, self._divergence_advice)
        if not bool(torch.stack([torch.isfinite(p).all() for p in learner.parameters()]).all()):
            raise TrainingDiverged(f"training diverged: the weights are not finite after outer step {step}."
                                   f"{self._divergence_advice()}")

    def _divergence_advice(self) -> str:
        """What is left of a diverged run, and what to do (read only when it diverged)."""
        newest = sorted(self.checkpoints.glob("step-*.json"))
        if not newest:
            return " No checkpoint was written. Lower meta_lr or inner_lr and train again."
        return (f" Checkpoints written before it are kept (the newest: {newest[-1].name}), but resuming repeats "
                "the divergence: start a new run with a lower meta_lr or inner_lr.")

    def _validate(self, experiment: Experiment, state: dict[str, Any], bar: Any) -> None:
        config = self.config
        estimates = evaluate_learner(experiment.learner, experiment.validation, config.validation_episodes,
                             inner_steps=config.effective_eval_inner_steps)
        score_name = "accuracy" if "accuracy" in estimates else "loss"
        score = estimates[score_name].mean
        self._log(state, {"step": state["step"], "phase": "validation", "loss": estimates["loss"].mean,
                          "accuracy": estimates["accuracy"].mean if "accuracy" in estimates else None,
                          "lr": None, "tasks_per_s": None, "elapsed_s": state["train_seconds"]}, bar)
        better = state["best"] is None or (score > state["best"]["score"] if score_name == "accuracy"
                                           else score < state["best"]["score"])
        if better:
            state["best"] = {"step": state["step"], "score": score, "metric": score_name}
            state["since_best"] = 0
            save_checkpoint(self.checkpoints, "best", self._learner_tensors(experiment.learner),
                            {"step": state["step"], "validation": {score_name: score}})
        else:
            state["since_best"] += 1
            if config.early_stopping and state["since_best"] >= config.early_stopping:
                state["stopped_early"] = True
        if config.keep_best > 1:
            keep_top_checkpoints(self.checkpoints, self._learner_tensors(experiment.learner),
                                 {"step": state["step"], "validation": {score_name: score}},
                                 ranked_validation_steps(state["history"])[:config.keep_best])

    # -- state, checkpoints, files -------------------------------------------------------------
    def _fresh_state(self) -> dict[str, Any]:
        return {"step": 0, "history": [], "best": None, "since_best": 0, "stopped_early": False,
                "train_seconds": 0.0, "window": {}}

    @staticmethod
    def _learner_tensors(learner: nn.Module) -> dict[str, Tensor]:
        return {f"learner.{k}": v.detach() for k, v in learner.state_dict().items()}

    def _checkpoint(self, learner: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    window: dict[str, list[Tensor]]) -> None:
        """Everything to continue exactly: weights, optimizer, RNG, and the metrics of the steps since
        the last log (so the next logged row averages the same steps as an uninterrupted run)."""
        optimizer_tensors, optimizer_rest = optimizer_to_tensors(optimizer)
        pending = {f"window.{name}": torch.stack(values) for name, values in window.items()}
        tensors = {**self._learner_tensors(learner), **optimizer_tensors, **pending, "rng.torch": torch.get_rng_state()}
        save_checkpoint(self.checkpoints, step_name(state["step"]), tensors,
                        {**state, "optimizer": optimizer_rest, "config": self.config.to_dict()})
        prune_checkpoints(self.checkpoints, _KEEP_CHECKPOINTS)

    def _restore(self, learner: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if not (self.run_dir / "config.json").is_file():
            raise CheckpointError(f"nothing to resume in {self.run_dir}: no config.json (not a run directory)")
        tensors, saved, manifest = latest_checkpoint(self.checkpoints)
        # keys added to the library since the run was made take their defaults (a new key's default
        # must be the behaviour before it existed, as inner_state: fresh is)
        made_with = _result_keys(saved_config(saved["config"], manifest).to_dict())
        now = _result_keys(self.config.to_dict())
        if made_with != now:
            changed = sorted(k for k in made_with.keys() | now.keys() if made_with.get(k) != now.get(k))
            raise ConfigError(f"the run in {self.run_dir} was made with other settings ({', '.join(changed)}); "
                              "resume it with its own config (fastadapt train --resume RUN_DIR)")
        load_module_tensors(learner, tensors, "learner.", manifest)
        optimizer_from_tensors(optimizer, tensors, saved.pop("optimizer"))
        torch.set_rng_state(tensors["rng.torch"])
        saved.pop("config")
        device = next(learner.parameters()).device  # the window joins this run's metrics, wherever it runs
        saved["window"] = {k[len("window."):]: list(v.to(device).unbind())
                           for k, v in tensors.items() if k.startswith("window.")}
        self._write_metrics(saved["history"])
        return saved

    def _start_run_dir(self) -> None:
        if self.checkpoints.exists() and any(self.checkpoints.glob("*.json")):
            raise ConfigError(f"{self.run_dir} already holds a run; resume it with --resume or choose another --out")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"the run directory {self.run_dir} (--out) is a file or lies under one; give a folder "
                              "that is new or holds no run") from None
        write_json(self.run_dir / "config.json", self.config.to_dict())
        write_json(self.run_dir / "environment.json", {
            "fastadapt": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "threads": torch.get_num_threads(), **_checkout_state(),
            "command": sys.argv, "seed": self.config.seed, "device": self.config.device,
            "gpu": torch.cuda.get_device_name(self.config.device) if self.config.device.startswith("cuda") else None,
        })
        self._write_metrics([])

    def _event_writer(self, first_step: int) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("tensorboard: true needs the tensorboard package: pip install 'fastadapt[tensorboard]'") from None
        # purge_step drops events a killed run wrote after its last checkpoint
        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=first_step if first_step > 1 else None)

    def _log(self, state: dict[str, Any], row: dict[str, Any], bar: Any) -> None:
        state["history"].append(row)
        self._write_metrics(state["history"])
        if self.events is not None:
            for key in ("loss", "accuracy", "lr", "tasks_per_s"):
                if row[key] is not None:
                    self.events.add_scalar(f"{row['phase']}/{key}", row[key], row["step"])
        if bar is not None and row["phase"] == "train":
            shown = {"loss": f"{row['loss']:.4f}", "tasks/s": f"{row['tasks_per_s']:.1f}"}
            if row["accuracy"] is not None:
                shown["acc"] = f"{row['accuracy']:.4f}"
            bar.set_postfix(shown, refresh=False)
        if self.on_row is not None:
            self.on_row(row)

    def _write_metrics(self, history: list[dict[str, Any]]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in METRIC_COLUMNS})
        with atomic_path(self.run_dir / "metrics.csv") as tmp:
            tmp.write_text(text.getvalue())

    def _bar(self, start: int) -> Any:
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.iterations, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def _results(self, estimates: dict[str, Estimate], state: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
        metric = headline_metric(estimates)
        trained_tasks = state["step"] * self.config.meta_batch
        return {
            "metric": metric if metric == "accuracy" else "mse",
            "mean": estimates[metric].mean,
            "ci95": estimates[metric].ci95,
            "episodes": estimates[metric].episodes,
            "seed": self.config.seed,
            "config": self.config.to_dict(),
            "wall_time_s": wall_seconds,
            "train_time_s": state["train_seconds"],
            "tasks_per_s": trained_tasks / state["train_seconds"] if state["train_seconds"] else None,
            "steps": state["step"],
            "stopped_early": state["stopped_early"],
            "best_step": state["best"]["step"] if state["best"] else None,
            "metrics": {k: {"mean": e.mean, "ci95": e.ci95} for k, e in estimates.items()},
            "versions": {"fastadapt": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }
