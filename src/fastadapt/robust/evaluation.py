"""Learners under attack, with the attacker standing at one of three places (`TARGETS`):

- "query": the learner adapts to the clean support set, then its predictor is attacked on the
  query set (evasion after adaptation);
- "support": the support set is perturbed so that the learner adapted on it fails on the clean
  queries (poisoning): the attack differentiates the query loss through the learner's adaptation
  (every learner's `adapt` is differentiable w.r.t. a support set that requires grad: MAML's
  unrolled steps, iMAML's, Reptile's and Baseline's fine-tuning, the prototypes);
- "both": the support set poisoned as above, then the queries attacked against the poisoned learner.

Means and confidence intervals over fixed episodes: `training.evaluate.evaluate_under_attack`.
The learner runs as in evaluation (eval mode, nothing written into its module). An attack's random
start for episode `i` draws from `attack_generator(seed, i)` (the support set's from a second
stream), streams of their own beside the episode's: the same (seed, episode) gives the same
perturbation, whatever the batch size.

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
from .attacks import Attack, default_loss

__all__ = ["TARGETS", "attack_generator", "attacked_task_metrics"]

TARGETS = ("query", "support", "both")
# the third key of an attack's seed sequence: apart from the episode's own draws
_STREAMS = {"query": 1, "support": 5}


def attack_generator(seed: int, index: int, where: str = "query") -> torch.Generator:
    """The random stream of the attack on episode `index`'s query set (or support set: `where`) of a
    source with `seed`.

    Example:
        >>> a, b = attack_generator(0, 5), attack_generator(0, 5)
        >>> bool(torch.rand(3, generator=a).equal(torch.rand(3, generator=b)))
        True
    """
    key = [seed, index, _STREAMS[where]]
    return torch.Generator().manual_seed(int(np.random.default_rng(key).integers(2**62)))


def attacked_task_metrics(learner: Learner, batch: TaskBatch, attack: Attack, *, seed: int, first_index: int,
                          inner_steps: int | None = None, target: str = "query") -> dict[str, Tensor]:
    """Per-task metrics `(T,)` of `learner` on the batch's query sets with the attacker at `target`
    (`TARGETS`, see the module docstring); task `t` is episode `first_index + t` of a source with `seed`."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    steps = _steps(learner, inner_steps)
    rows = []
    for t in range(len(batch)):
        episode = batch[t]
        support_x = episode.support_x
        if target != "query":
            support_x = attack.perturb(
                lambda s: default_loss(learner.adapt(s, episode.support_y, **steps)(episode.query_x), episode.query_y),
                support_x, generator=attack_generator(seed, first_index + t, "support"))
        with torch.no_grad():  # the adapted parameters are constants to the query attacker
            predictor = learner.adapt(support_x, episode.support_y, **steps)
        query_x = episode.query_x
        if target != "support":
            query_x = attack(predictor, query_x, episode.query_y, generator=attack_generator(seed, first_index + t))
        with torch.no_grad():
            rows.append(task_metrics(learner.task, predictor(query_x), episode.query_y))
    return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}


def _steps(learner: Learner, inner_steps: int | None) -> dict[str, int]:
    """`steps=` for learners whose `adapt` takes it (the gradient-based ones), when given; the others
    ignore it, as their `task_metrics` do."""
    if inner_steps is None or "steps" not in inspect.signature(learner.adapt).parameters:
        return {}
    return {"steps": inner_steps}
