"""Evaluation on fixed episodes with honest 95% confidence intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass
import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..algorithms.base import Learner
from ..algorithms.objectives import gaussian_parameters, predictive_mean, task_metrics
from ..calibration import Summary, classification_summary, predictive_probs, regression_summary
from ..calibration.summary import RESAMPLES
from ..functional.task_batched import thread_safe_forward
from ..data.episodes import TaskBatch
from ..data.sampler import TaskSource
from ..robust import Attack, attacked_task_metrics, corrupted_batch
from ..runtime import map_in_threads

__all__ = ["Estimate", "mean_ci95", "headline_metric", "evaluate_learner", "evaluate_ensemble", "evaluate_calibration", "evaluate_regression_calibration", "predictive_bands",
           "collect_over_episodes", "evaluate_under_attack", "evaluate_corrupted",
           "estimate_over_episodes"]


@dataclass(frozen=True)
class Estimate:
    """A mean over episodes and the half-width of its 95% confidence interval."""

    mean: float
    ci95: float
    episodes: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} +- {self.ci95:.4f}"


def headline_metric(estimates: dict[str, Any]) -> str:
    """The estimate a run is reported by: `accuracy` (classification), `mse` (a Gaussian output's
    mean), else `loss` (regression's MSE).

    Example:
        >>> headline_metric({"loss": 1.0, "mse": 0.5})
        'mse'
    """
    return next(name for name in ("accuracy", "mse", "loss") if name in estimates)


def mean_ci95(values: Tensor) -> Estimate:
    """Mean and 1.96 standard errors (sample std, n-1) of per-episode values.

    Example:
        >>> import torch
        >>> e = mean_ci95(torch.tensor([1.0, 0.0, 1.0, 0.0]))
        >>> round(e.mean, 3), round(e.ci95, 3)
        (0.5, 0.566)
    """
    values = values.double().flatten()
    n = values.numel()
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 episodes, got {n}")
    return Estimate(float(values.mean()), 1.96 * float(values.std(unbiased=True)) / math.sqrt(n), n)


def evaluate_learner(learner: Learner, source: TaskSource, episodes: int = 1000, *, batch_size: int = 32,
             inner_steps: int | None = None) -> dict[str, Estimate]:
    """Adapts to test episodes 0..episodes-1 of `source` and estimates every per-task metric.

    The episodes are a pure function of `source.seed`, so every algorithm and every run sees the
    very same ones. The learner runs in eval mode (Dropout off; BatchNorm with running
    statistics reads them, never updates them) with no outer graph, and nothing is written into its
    module; its modes are restored after. A learner on the CPU with `task_workers` N > 1 (it
    accepts N only where its forward is thread-safe) evaluates N batches at once in threads with
    one intra-op thread each: a one-thread evaluation's numbers, faster on N cores.

    Example:
        >>> from fastadapt import MAML, SinusoidTasks
        >>> from fastadapt.nn import MLP
        >>> result = evaluate_learner(MAML(MLP(), 0.01, task="regression"), SinusoidTasks(seed=1), episodes=8)
        >>> sorted(result)
        ['loss', 'loss_before']
    """
    return estimate_over_episodes(lambda batch, start: learner.task_metrics(batch, inner_steps=inner_steps), source,
                                  episodes, batch_size, [learner])


def evaluate_ensemble(learners: Sequence[Learner], source: TaskSource, episodes: int = 1000, *, batch_size: int = 32,
                      inner_steps: int | None = None) -> dict[str, Estimate]:
    """Like `evaluate_learner`, for the predictive mean of several learners: each adapts to an
    episode on its own; a classifier's members' probabilities are averaged (a deep ensemble's
    predictive distribution; with Bayesian members, every sample of every member counts once), a
    regressor's outputs, Gaussian outputs moment-matched (`objectives.predictive_mean`); the per-episode `loss` (and `accuracy`) is measured on that mean. MAML++
    (Antoniou et al. 2019) reports the ensemble of its five best validation checkpoints this way.

    Example:
        >>> from fastadapt import MAML, SinusoidTasks
        >>> from fastadapt.nn import MLP
        >>> pair = [MAML(MLP(), 0.01, task="regression") for _ in range(2)]
        >>> sorted(evaluate_ensemble(pair, SinusoidTasks(seed=1), episodes=8))
        ['loss']
    """
    kind = ensemble_kind(learners)

    def metrics(batch: TaskBatch, start: int) -> dict[str, Tensor]:
        mean = predictive_mean(kind, ensemble_samples(learners, batch, inner_steps), 2)
        rows = [task_metrics(kind, mean[t], batch.query_y[t]) for t in range(len(batch))]
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}

    return estimate_over_episodes(metrics, source, episodes, batch_size, learners)


def ensemble_kind(learners: Sequence[Learner]) -> str:
    """The one kind of task every learner of an ensemble solves (refused if none or several)."""
    if not learners:
        raise ValueError("an ensemble needs at least one learner")
    kinds = {learner.task for learner in learners}
    if len(kinds) != 1:
        raise ValueError(f"an ensemble's learners must solve one kind of task, got {sorted(kinds)}")
    return kinds.pop()


def ensemble_samples(learners: Sequence[Learner], batch: TaskBatch, inner_steps: int | None) -> Tensor:
    """Every learner's query samples `(T, queries, samples, outputs)`, concatenated over samples."""
    return torch.cat([learner.query_samples(batch, inner_steps=inner_steps) for learner in learners], 2)


def evaluate_calibration(learners: Sequence[Learner], source: TaskSource, episodes: int = 1000, *, batch_size: int = 32,
                         inner_steps: int | None = None, temperature: float = 1.0, resamples: int = RESAMPLES,
                         also_uncalibrated: bool = False) -> Summary:
    """Accuracy, NLL (`loss`), Brier, ECE, MCE and adaptive ECE (`calibration.classification_summary`:
    binned errors pooled over every query, their intervals bootstrapped over episodes) of the
    predictive distribution of a classifier, or the mean of several (`evaluate_ensemble`), on test
    episodes 0..episodes-1 of `source`; every sample's logits divided by `temperature` first.
    `also_uncalibrated`: the same at temperature 1 from the same predictions, in
    `extra["uncalibrated"]` (no second evaluation).

    Example:
        >>> from fastadapt import ProtoNet, EpisodeSampler
        >>> from fastadapt.data import ImageClassDataset
        >>> from fastadapt.nn import Conv4
        >>> data = ImageClassDataset(torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8), torch.arange(40) // 4)
        >>> summary = evaluate_calibration([ProtoNet(Conv4.omniglot(ways=None))], EpisodeSampler(data, 5, 1, 2), 4)
        >>> sorted(summary.estimates)
        ['accuracy', 'adaptive_ece', 'brier', 'ece', 'loss', 'mce']
    """
    if ensemble_kind(learners) != "classification":
        raise ValueError("calibration of class probabilities needs classifiers; regression learners with a Gaussian "
                         "output are measured by evaluate_regression_calibration")
    def probabilities(batch: TaskBatch, start: int) -> dict[str, Tensor]:
        samples = ensemble_samples(learners, batch, inner_steps)
        return {"probs": predictive_probs(samples, temperature).cpu(), "labels": batch.query_y.cpu(),
                **({"plain": predictive_probs(samples).cpu()} if also_uncalibrated else {})}

    collected = collect_over_episodes(probabilities, source, episodes, batch_size, learners)
    summary = classification_summary(collected["probs"], collected["labels"], resamples=resamples, seed=source.seed)
    if also_uncalibrated:
        plain = classification_summary(collected["plain"], collected["labels"], resamples=resamples, seed=source.seed)
        summary.extra["uncalibrated"] = {k: {"mean": m, "ci95": c} for k, (m, c) in plain.estimates.items()}
    return summary


def evaluate_regression_calibration(learners: Sequence[Learner], source: TaskSource, episodes: int = 1000, *,
                                    batch_size: int = 32, inner_steps: int | None = None,
                                    resamples: int = RESAMPLES) -> Summary:
    """NLL (`loss`), MSE, CRPS, interval coverage at 50/90/95% and the quantile calibration error
    (`calibration.regression_summary`) of learners with a Gaussian output (task "gaussian"), every
    sample of every learner a component of the predictive mixture, on test episodes 0..episodes-1.

    Example:
        >>> from fastadapt import MAML, SinusoidTasks
        >>> from fastadapt.nn import MLP
        >>> summary = evaluate_regression_calibration([MAML(MLP(1, [8], 2), 0.01, task="gaussian")], SinusoidTasks(seed=1), 4)
        >>> round(summary.estimates["picp90"][0], 2) >= 0
        True
    """
    if ensemble_kind(learners) != "gaussian":
        raise ValueError("interval calibration needs learners with a Gaussian output (task 'gaussian', likelihood: "
                         "gaussian)")

    def gaussians(batch: TaskBatch, start: int) -> dict[str, Tensor]:
        means, stds = gaussian_parameters(ensemble_samples(learners, batch, inner_steps))  # (T, Q, S, 1)
        return {"means": means.squeeze(-1).cpu(), "stds": stds.squeeze(-1).cpu(), "target": batch.query_y.squeeze(-1).cpu()}

    collected = collect_over_episodes(gaussians, source, episodes, batch_size, learners)
    return regression_summary(collected["means"], collected["stds"], collected["target"], resamples=resamples,
                              seed=source.seed)


def predictive_bands(learners: Sequence[Learner], source: TaskSource, *, episodes: int = 4, points: int = 100,
                     inner_steps: int | None = None) -> list[dict[str, Any]]:
    """For plots of a Gaussian-output regressor: test episodes 0..episodes-1 of `source`, each with
    its support and query points and every predictive sample's mean and std on `points` inputs
    evenly spaced over the episode's input range (the support sets are the evaluated ones, so
    sampling learners draw the very samples they were scored with)."""
    batch = source.task_batch(0, episodes)
    low = min(float(batch.support_x.min()), float(batch.query_x.min()))
    high = max(float(batch.support_x.max()), float(batch.query_x.max()))
    grid = torch.linspace(low, high, points, dtype=batch.query_x.dtype, device=batch.query_x.device)
    on_grid = TaskBatch(batch.support_x, batch.support_y, grid.view(1, points, 1).expand(episodes, points, 1),
                        torch.zeros(episodes, points, 1, dtype=batch.query_y.dtype, device=batch.query_y.device))
    with contextlib.ExitStack() as stack:
        for learner in learners:
            stack.enter_context(learner.evaluation())
        means, stds = gaussian_parameters(ensemble_samples(learners, on_grid, inner_steps))  # (T, points, S, 1)
    listed = lambda t: t.squeeze(-1).tolist()  # noqa: E731
    return [{"support_x": listed(batch.support_x[t].cpu()), "support_y": listed(batch.support_y[t].cpu()),
             "query_x": listed(batch.query_x[t].cpu()), "query_y": listed(batch.query_y[t].cpu()), "x": grid.tolist(),
             "means": means[t, :, :, 0].T.cpu().tolist(), "stds": stds[t, :, :, 0].T.cpu().tolist()}
            for t in range(episodes)]


def evaluate_under_attack(learner: Learner, source: TaskSource, attack: Attack, episodes: int = 1000, *,
                          batch_size: int = 32, inner_steps: int | None = None, target: str = "query"
                          ) -> dict[str, Estimate]:
    """Like `evaluate_learner`, with every episode attacked at `target`: its query set after
    adaptation, its support set through adaptation (poisoning) or both (`robust.attacked_task_metrics`;
    the attack's random start from the source's seed and the episode's index). `attack` with
    `eps=0` gives the clean numbers.

    Example:
        >>> from fastadapt import MAML, SinusoidTasks
        >>> from fastadapt.nn import MLP
        >>> from fastadapt.robust import pgd
        >>> attack = pgd(0.1, steps=3, bounds=(-5.0, 5.0))
        >>> sorted(evaluate_under_attack(MAML(MLP(), 0.01, task="regression"), SinusoidTasks(seed=1), attack, episodes=4))
        ['loss']
    """
    return estimate_over_episodes(
        lambda batch, start: attacked_task_metrics(learner, batch, attack, seed=source.seed, first_index=start,
                                                   inner_steps=inner_steps, target=target),
        source, episodes, batch_size, [learner])


def evaluate_corrupted(learner: Learner, source: TaskSource, name: str, severity: int, where: str = "both",
                       episodes: int = 1000, *, batch_size: int = 32, inner_steps: int | None = None) -> dict[str, Estimate]:
    """Like `evaluate_learner`, with every episode's support and/or query inputs corrupted
    (`robust.corrupted_batch`: `name` at `severity` 1-5, `where` support, query or both).

    Example:
        >>> from fastadapt import ProtoNet, EpisodeSampler
        >>> from fastadapt.data import ImageClassDataset
        >>> from fastadapt.nn import Conv4
        >>> data = ImageClassDataset(torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8), torch.arange(40) // 4)
        >>> sorted(evaluate_corrupted(ProtoNet(Conv4.omniglot(ways=None)), EpisodeSampler(data, 5, 1, 2), "rotation", 2,
        ...                           episodes=4))
        ['accuracy', 'loss']
    """
    return estimate_over_episodes(
        lambda batch, start: learner.task_metrics(
            corrupted_batch(batch, name, severity, where, seed=source.seed, first_index=start), inner_steps=inner_steps),
        source, episodes, batch_size, [learner])


def _workers(learners: Sequence[Learner]) -> int:
    """How many episode batches the learners evaluate at once: their `task_workers` on the CPU where
    every forward is (still) thread-safe, else 1."""
    on_cpu = all(p.device.type == "cpu" for learner in learners for p in learner.parameters())
    workers = min(learner.task_workers for learner in learners) if on_cpu else 1
    return workers if workers > 1 and all(thread_safe_forward(learner.model) for learner in learners) else 1


def estimate_over_episodes(metrics: Callable[[TaskBatch, int], dict[str, Tensor]], source: TaskSource, episodes: int,
                           batch_size: int, learners: Sequence[Learner]) -> dict[str, Estimate]:
    """`metrics(batch, start)` (per-task `(T,)` tensors of episodes `start, start + 1, ...`) over test
    episodes 0..episodes-1 of `source` (`collect_over_episodes`), as a mean and 95% interval each."""
    return {name: mean_ci95(values) for name, values in
            collect_over_episodes(metrics, source, episodes, batch_size, learners).items()}


def collect_over_episodes(metrics: Callable[[TaskBatch, int], dict[str, Tensor]], source: TaskSource, episodes: int,
                          batch_size: int, learners: Sequence[Learner]) -> dict[str, Tensor]:
    """`metrics(batch, start)` (tensors with one row per task of episodes `start, start + 1, ...`)
    over test episodes 0..episodes-1 of `source`, `batch_size` at a time (`_workers` batches at
    once, `runtime.map_in_threads`), concatenated in episode order. The learners' eval mode is
    entered here, in the calling thread, before any worker starts."""
    starts = list(range(0, episodes, batch_size))
    collected: dict[str, list[Tensor]] = {}
    with contextlib.ExitStack() as stack:
        for learner in learners:
            stack.enter_context(learner.evaluation())
        for batch_metrics in map_in_threads(
                lambda start: metrics(source.task_batch(start, min(batch_size, episodes - start)), start),
                starts, _workers(learners)):
            for name, value in batch_metrics.items():
                collected.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in collected.items()}
