"""From a `Config` to the objects of a run: the learner and its train / validation / test task sources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..algorithms import ANIL, FOMAML, IMAML, MAML, Baseline, MAMLPlusPlus, MatchingNet, MetaSGD, ProtoNet, Reptile
from ..data import ClassBatchSampler, DeviceTasks, EpisodeSampler, SinusoidTasks, TaskSource
from ..nn import MLP, Conv4
from .config import Config, ConfigError

__all__ = ["Experiment", "build_learner", "build_experiment", "test_source", "baseline_classes", "resolve_device"]

_GRADIENT_LEARNERS = {"maml": MAML, "fomaml": FOMAML, "metasgd": MetaSGD, "anil": ANIL, "maml++": MAMLPlusPlus}

# Sinusoid validation and test tasks come from seeds far from any training seed.
_SINUSOID_VALIDATION_SEED = 20_000
_SINUSOID_TEST_SEED = 10_000
# Omniglot's standard split (data.omniglot.omniglot_splits): 1200 meta-training characters, each
# at 4 rotations; validation characters are carved out of them. Baseline's global head needs the
# class count before any data is read (evaluation rebuilds the learner from the config alone).
_OMNIGLOT_TRAIN_CHARACTERS, _OMNIGLOT_ROTATIONS = 1200, 4


def baseline_classes(config: Config) -> int:
    """Classes of Baseline's pre-training head: Omniglot's meta-training classes under `config`.

    Example:
        >>> baseline_classes(Config(algorithm="baseline", dataset="omniglot", backbone="conv4"))
        4800
    """
    return _OMNIGLOT_ROTATIONS * (_OMNIGLOT_TRAIN_CHARACTERS - config.validation_characters)


def resolve_device(name: str) -> torch.device:
    """The torch device `name` (cpu, cuda, cuda:N), refused with the reason if this machine lacks it.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for, but torch {torch.__version__} sees no CUDA GPU here "
                              "(torch.cuda.is_available() is False); use device: cpu (--device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} was asked for, but this machine has {torch.cuda.device_count()} "
                              f"CUDA GPU(s): use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


@dataclass
class Experiment:
    """The learner and the task sources of one run."""

    learner: nn.Module
    train: TaskSource
    validation: TaskSource | None
    test: TaskSource


def build_learner(config: Config) -> nn.Module:
    """A freshly initialised learner on `config.device` (weights from `torch.manual_seed(config.seed)`,
    drawn on the CPU: the same initial weights on every device).

    Example:
        >>> type(build_learner(Config())).__name__
        'MAML'
    """
    device = resolve_device(config.device)
    return _new_learner(config).to(device)


def _new_learner(config: Config) -> nn.Module:
    torch.manual_seed(config.seed)
    if config.backbone == "mlp":
        model: nn.Module = MLP(1, [40, 40], 1)
    else:
        pooling = "stride" if config.backbone == "conv4-strided" else "max"
        # Baseline: ordinary BatchNorm (eval-mode embeddings), as Chen et al.
        model = Conv4.omniglot(ways=None if config.algorithm in ("protonet", "matchingnet", "baseline") else config.ways,
                               track_running_stats=config.algorithm == "baseline", pooling=pooling)
    if config.algorithm == "protonet":
        return ProtoNet(model, precision=config.precision)
    if config.algorithm == "matchingnet":
        return MatchingNet(model, fce=config.fce, fce_steps=config.fce_steps,
                           similarity=config.similarity)  # type: ignore[arg-type]
    if config.algorithm == "reptile":
        return Reptile(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                       inner_optimizer=config.inner_optimizer, inner_batch=config.inner_batch,  # type: ignore[arg-type]
                       eval_inner_steps=config.effective_eval_inner_steps, eval_inner_batch=config.eval_inner_batch,
                       inner_state=config.inner_state, task=config.task)  # type: ignore[arg-type]
    if config.algorithm == "baseline":
        return Baseline(model, baseline_classes(config), head=config.head)  # type: ignore[arg-type]
    if config.algorithm == "imaml":
        return IMAML(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps, lam=config.imaml_lambda,
                     eval_lam=config.eval_imaml_lambda, cg_steps=config.cg_steps, cg_damping=config.cg_damping,
                     inner_optimizer=config.inner_optimizer, proximal=config.imaml_proximal,  # type: ignore[arg-type]
                     task=config.task, task_workers=config.task_workers)  # type: ignore[arg-type]
    return _GRADIENT_LEARNERS[config.algorithm](model, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                                                task=config.task, precision=config.precision, compile=config.compile,
                                                checkpoint_inner_loop=config.checkpoint_inner_loop,
                                                task_workers=config.task_workers, inner_optimizer=config.inner_optimizer,
                                                **config.mamlpp_options())


def _omniglot_splits(config: Config) -> dict[str, Any]:
    from ..data.omniglot import omniglot_splits

    return omniglot_splits(config.data_root, validation_characters=config.validation_characters)


def test_source(config: Config, ways: int | None = None, shots: int | None = None,
                queries: int | None = None, splits: dict[str, Any] | None = None) -> TaskSource:
    """The fixed test episodes (seeded by `eval_seed`), optionally at other ways / shots / queries."""
    ways, shots, queries = ways or config.ways, shots or config.shots, queries or config.eval_queries
    if config.dataset == "sinusoid":
        return _placed(config, SinusoidTasks(shots, queries, seed=_SINUSOID_TEST_SEED + config.eval_seed))
    splits = splits or _omniglot_splits(config)
    return _placed(config, EpisodeSampler(splits["test"], ways, shots, queries, seed=config.eval_seed))


def _placed(config: Config, source: TaskSource) -> TaskSource:
    """`source` delivering its episodes on the config's device (unchanged on the CPU)."""
    device = resolve_device(config.device)
    return source if device.type == "cpu" else DeviceTasks(source, device)


def _pretraining_batches(config: Config, dataset: Any) -> ClassBatchSampler:
    """Baseline's pre-training batches: `train_ways` classes x `train_shots` images each, global labels."""
    batches = ClassBatchSampler(dataset, config.effective_train_ways, config.effective_train_shots, seed=config.seed)
    if batches.num_classes != baseline_classes(config):
        raise ValueError(f"the Omniglot training split has {batches.num_classes} classes, Baseline's head "
                         f"{baseline_classes(config)} (1200 characters x 4 rotations, less validation, expected)")
    return batches


def build_experiment(config: Config) -> Experiment:
    """The learner and task sources for `config`; loads the dataset (errors name the missing files)."""
    learner = build_learner(config)
    if config.dataset == "sinusoid":
        train: TaskSource = SinusoidTasks(config.effective_train_shots, config.queries, seed=config.seed)
        validation = SinusoidTasks(config.shots, config.eval_queries, seed=_SINUSOID_VALIDATION_SEED + config.eval_seed)
        return Experiment(learner, _placed(config, train),
                          _placed(config, validation) if config.validation_every else None, test_source(config))
    splits = _omniglot_splits(config)
    if config.algorithm == "baseline":
        train = _pretraining_batches(config, splits["train"])
    else:
        train = EpisodeSampler(splits["train"], config.effective_train_ways, config.effective_train_shots, config.queries,
                               seed=config.seed)
    validation = (EpisodeSampler(splits["validation"], config.ways, config.shots, config.eval_queries, seed=config.eval_seed)
                  if "validation" in splits else None)
    return Experiment(learner, _placed(config, train), None if validation is None else _placed(config, validation),
                      test_source(config, splits=splits))
