"""From a `Config` to the objects of a run: the learner and its train / validation / test task sources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..algorithms import ANIL, FOMAML, MAML, MetaSGD, ProtoNet
from ..data import EpisodeSampler, SinusoidTasks, TaskSource
from ..nn import MLP, Conv4
from .config import Config

__all__ = ["Experiment", "build_learner", "build_experiment", "test_source"]

_GRADIENT_LEARNERS = {"maml": MAML, "fomaml": FOMAML, "metasgd": MetaSGD, "anil": ANIL}

# Sinusoid validation and test tasks come from seeds far from any training seed.
_SINUSOID_VALIDATION_SEED = 20_000
_SINUSOID_TEST_SEED = 10_000


@dataclass
class Experiment:
    """The learner and the task sources of one run."""

    learner: nn.Module
    train: TaskSource
    validation: TaskSource | None
    test: TaskSource


def build_learner(config: Config) -> nn.Module:
    """A freshly initialised learner (weights from `torch.manual_seed(config.seed)`).

    Example:
        >>> type(build_learner(Config())).__name__
        'MAML'
    """
    torch.manual_seed(config.seed)
    if config.backbone == "mlp":
        model: nn.Module = MLP(1, [40, 40], 1)
    else:
        model = Conv4.omniglot(ways=None if config.algorithm == "protonet" else config.ways)
    if config.algorithm == "protonet":
        return ProtoNet(model, precision=config.precision)
    return _GRADIENT_LEARNERS[config.algorithm](model, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                                                task=config.task, precision=config.precision, compile=config.compile,
                                                checkpoint_inner_loop=config.checkpoint_inner_loop)


def _omniglot_splits(config: Config) -> dict[str, Any]:
    from ..data.omniglot import omniglot_splits

    return omniglot_splits(config.data_root, validation_characters=config.validation_characters)


def test_source(config: Config, ways: int | None = None, shots: int | None = None,
                queries: int | None = None, splits: dict[str, Any] | None = None) -> TaskSource:
    """The fixed test episodes (seeded by `eval_seed`), optionally at other ways / shots / queries."""
    ways, shots, queries = ways or config.ways, shots or config.shots, queries or config.eval_queries
    if config.dataset == "sinusoid":
        return SinusoidTasks(shots, queries, seed=_SINUSOID_TEST_SEED + config.eval_seed)
    splits = splits or _omniglot_splits(config)
    return EpisodeSampler(splits["test"], ways, shots, queries, seed=config.eval_seed)


def build_experiment(config: Config) -> Experiment:
    """The learner and task sources for `config`; loads the dataset (errors name the missing files)."""
    learner = build_learner(config)
    if config.dataset == "sinusoid":
        train: TaskSource = SinusoidTasks(config.shots, config.queries, seed=config.seed)
        validation = SinusoidTasks(config.shots, config.eval_queries, seed=_SINUSOID_VALIDATION_SEED + config.eval_seed)
        return Experiment(learner, train, validation if config.validation_every else None, test_source(config))
    splits = _omniglot_splits(config)
    train = EpisodeSampler(splits["train"], config.effective_train_ways, config.shots, config.queries, seed=config.seed)
    validation = (EpisodeSampler(splits["validation"], config.ways, config.shots, config.eval_queries, seed=config.eval_seed)
                  if "validation" in splits else None)
    return Experiment(learner, train, validation, test_source(config, splits=splits))
