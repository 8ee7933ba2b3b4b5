"""Learners under attack: every learner adapts to a clean support set, then its predictor is
attacked on the query set (the attacker stands after adaptation). Means and confidence intervals
over fixed episodes: `training.evaluate.evaluate_under_attack`.

The learner runs as in evaluation (eval mode, nothing written into its module). An attack's random
start for episode `i` draws from `attack_generator(seed, i)`, a stream of its own beside the
episode's: the same (seed, episode) gives the same perturbation, whatever the batch size.

Example:
    >>> from fastadapt import MAML, SinusoidTasks
    >>> from fastadapt.nn import MLP
    >>> from fastadapt.robust import pgd
    >>> batch = SinusoidTasks(seed=1).task_batch(0, 2)
    >>> metrics = attacked_task_metrics(MAML(MLP(), 0.01, task="regression").eval(), batch,
    ...                                 pgd(0.1, steps=3, bounds=(-5.0, 5.0)), seed=1, first_index=0)
    >>> metrics["loss"].shape
    torch.Size([2])
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import Tensor

from ..algorithms.base import Learner
from ..algorithms.objectives import task_metrics
from ..data.episodes import TaskBatch
from .attacks import Attack

__all__ = ["attack_generator", "attacked_task_metrics"]

_ATTACK_STREAM = 1  # the third key of an attack's seed sequence: apart from the episode's own draws


def attack_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of the attack on episode `index` of a source with `seed`.

    Example:
        >>> a, b = attack_generator(0, 5), attack_generator(0, 5)
        >>> bool(torch.rand(3, generator=a).equal(torch.rand(3, generator=b)))
        True
    """
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, index, _ATTACK_STREAM]).integers(2**62)))


def attacked_task_metrics(learner: Learner, batch: TaskBatch, attack: Attack, *, seed: int, first_index: int,
                          inner_steps: int | None = None) -> dict[str, Tensor]:
    """Per-task metrics `(T,)` of `learner` on the batch's query sets, attacked after adapting to
    the clean support sets; task `t` is episode `first_index + t` of a source with `seed`."""
    rows = []
    for t in range(len(batch)):
        episode = batch[t]
        with torch.no_grad():  # the adapted parameters are constants to the attacker
            predictor = learner.adapt(episode.support_x, episode.support_y, **_steps(learner, inner_steps))
        attacked = attack(predictor, episode.query_x, episode.query_y,
                          generator=attack_generator(seed, first_index + t))
        with torch.no_grad():
            rows.append(task_metrics(learner.task, predictor(attacked), episode.query_y))
    return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}


def _steps(learner: Learner, inner_steps: int | None) -> dict[str, int]:
    """`steps=` for learners whose `adapt` takes it (the gradient-based ones), when given; the others
    ignore it, as their `task_metrics` do."""
    if inner_steps is None or "steps" not in inspect.signature(learner.adapt).parameters:
        return {}
    return {"steps": inner_steps}
