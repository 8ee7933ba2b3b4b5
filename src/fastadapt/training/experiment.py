"""From a `Config` to the objects of a run: the learner and its train / validation / test task sources."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..algorithms import (ANIL, FOMAML, IMAML, MAML, Baseline, Learner, MAMLPlusPlus, MatchingNet, MetaSGD, ProtoNet,
                          Reptile)
from ..algorithms.objectives import trimmed_loss
from ..data import ClassBatchSampler, DeviceTasks, EpisodeSampler, TaskSource
from ..data.registry import dataset_info, dataset_splits, get_tasksets
from ..nn import MLP, Conv4, ResNet12
from ..probabilistic import BMAML, PLATIPUS, VAMPIRE
from .config import PROBABILISTIC, Config, ConfigError

__all__ = ["Experiment", "build_learner", "build_experiment", "test_source", "validation_source", "baseline_classes", "input_shape",
           "resolve_device"]

_GRADIENT_LEARNERS = {"maml": MAML, "fomaml": FOMAML, "metasgd": MetaSGD, "anil": ANIL, "maml++": MAMLPlusPlus}

# Omniglot's standard split (data.omniglot.omniglot_splits): 1200 meta-training characters, each
# at 4 rotations; validation characters are carved out of them. Baseline's global head needs the
# class count before any data is read (evaluation rebuilds the learner from the config alone).
_OMNIGLOT_TRAIN_CHARACTERS, _OMNIGLOT_ROTATIONS = 1200, 4


def baseline_classes(config: Config) -> int:
    """Classes of Baseline's pre-training head: the meta-training classes of `config`'s dataset
    (Omniglot: counted from its split without reading data; others: from the training split).

    Example:
        >>> baseline_classes(Config(algorithm="baseline", dataset="omniglot", backbone="conv4"))
        4800
    """
    if config.dataset == "omniglot":
        return _OMNIGLOT_ROTATIONS * (_OMNIGLOT_TRAIN_CHARACTERS - config.validation_characters)
    return dataset_splits(config.dataset, config.data_options())["train"].num_classes


def input_shape(config: Config, dataset: str | None = None) -> tuple[int, ...]:
    """The shape of one input of `dataset` (default: the run's) read with `config`'s data options.

    Example:
        >>> input_shape(Config(dataset="mnist", backbone="conv4"))
        (1, 28, 28)
    """
    spec = dataset or config.dataset
    info, argument = dataset_info(spec)
    return info.input_shape(argument, config.data_options())


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

    learner: Learner
    train: TaskSource
    validation: TaskSource | None
    test: TaskSource


def build_learner(config: Config) -> Learner:
    """A freshly initialised learner on `config.device` (weights from `torch.manual_seed(config.seed)`,
    drawn on the CPU: the same initial weights on every device).

    Example:
        >>> type(build_learner(Config())).__name__
        'MAML'
    """
    device = resolve_device(config.device)
    return _new_learner(config).to(device)


def _new_learner(config: Config) -> Learner:
    torch.manual_seed(config.seed)
    if config.backbone == "mlp":
        model: nn.Module = MLP(1, [40, 40], 2 if config.likelihood == "gaussian" else 1)
    else:
        channels, size, _ = input_shape(config)
        ways = None if config.algorithm in ("protonet", "matchingnet", "baseline") else config.ways
        running = config.algorithm == "baseline"  # Baseline: ordinary BatchNorm (eval-mode embeddings), as Chen et al.
        if config.backbone == "resnet12":
            model = ResNet12(channels, ways, track_running_stats=running, drop_rate=config.drop_rate)
        else:  # the literature's Conv4: 64 filters on grey characters and digits, 32 on colour images
            model = Conv4(channels, ways, hidden=64 if channels == 1 else 32, image_size=size,
                          track_running_stats=running, pooling="stride" if config.backbone == "conv4-strided" else "max")
    robust = config.robust_options()
    if config.algorithm in PROBABILISTIC:
        return _probabilistic_learner(config, model)
    if config.algorithm == "protonet":
        return ProtoNet(model, precision=config.precision, aggregation=config.aggregation, robust=robust)
    if config.algorithm == "matchingnet":
        return MatchingNet(model, fce=config.fce, fce_steps=config.fce_steps,
                           similarity=config.similarity, robust=robust)  # type: ignore[arg-type]
    if config.algorithm == "reptile":
        return Reptile(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                       inner_optimizer=config.inner_optimizer, inner_batch=config.inner_batch,  # type: ignore[arg-type]
                       eval_inner_steps=config.effective_eval_inner_steps, eval_inner_batch=config.eval_inner_batch,
                       inner_state=config.inner_state, task=config.learner_task)  # type: ignore[arg-type]
    if config.algorithm == "baseline":
        return Baseline(model, baseline_classes(config), head=config.head)  # type: ignore[arg-type]
    if config.algorithm == "imaml":
        return IMAML(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps, lam=config.imaml_lambda,
                     eval_lam=config.eval_imaml_lambda, cg_steps=config.cg_steps, cg_damping=config.cg_damping,
                     inner_optimizer=config.inner_optimizer, proximal=config.imaml_proximal,  # type: ignore[arg-type]
                     task=config.learner_task, task_workers=config.task_workers)  # type: ignore[arg-type]
    return _GRADIENT_LEARNERS[config.algorithm](model, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                                                task=config.learner_task, precision=config.precision, compile=config.compile,
                                                checkpoint_inner_loop=config.checkpoint_inner_loop,
                                                task_workers=config.task_workers, inner_optimizer=config.inner_optimizer,
                                                inner_loss_fn=trimmed_loss(config.learner_task, config.inner_trim)  # type: ignore[arg-type]
                                                if config.inner_trim else None,
                                                **config.mamlpp_options(), **(robust.seams(model) if robust else {}))


def _probabilistic_learner(config: Config, model: nn.Module) -> Learner:
    """VAMPIRE, PLATIPUS or BMAML on `model` with the config's inner loop and samples."""
    common = dict(inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                  eval_inner_steps=config.effective_eval_inner_steps, seed=config.seed, task=config.learner_task)
    if config.algorithm == "bmaml":
        return BMAML(model, particles=config.effective_samples, chaser_steps=config.chaser_steps, **common)
    options = dict(samples=config.effective_samples, eval_samples=config.effective_eval_samples,
                   kl_weight=config.kl_weight, prior_std=config.prior_std, **common)
    if config.algorithm == "vampire":
        return VAMPIRE(model, **options)
    return PLATIPUS(model, posterior_std=config.posterior_std, **options)


def test_source(config: Config, ways: int | None = None, shots: int | None = None, queries: int | None = None,
                splits: dict[str, Any] | None = None, dataset: str | None = None) -> TaskSource:
    """The fixed test episodes (seeded by `eval_seed`), optionally at other ways / shots / queries, or
    from the test split of another `dataset` (cross-domain: its inputs must have the shape the
    run's model takes, read at the run's `image_size` and `channels`)."""
    ways, shots, queries = ways or config.ways, shots or config.shots, queries or config.eval_queries
    if dataset is not None and dataset != config.dataset:
        _check_cross_domain(config, dataset)
        return _placed(config, get_tasksets(dataset, ways, shots, queries, eval_seed=config.eval_seed,
                                            options=replace(config.data_options(), validation=0)).test)
    if config.task == "regression":
        return _placed(config, get_tasksets(config.dataset, ways, shots, queries, eval_seed=config.eval_seed).test)
    splits = splits or dataset_splits(config.dataset, config.data_options())
    return _placed(config, EpisodeSampler(splits["test"], ways, shots, queries, seed=config.eval_seed))


def validation_source(config: Config, ways: int | None = None, shots: int | None = None,
                      queries: int | None = None) -> TaskSource:
    """The run's validation episodes (seeded by `eval_seed`), optionally at other ways / shots /
    queries: what is fitted after training (a temperature) is fitted here, never on test episodes.
    Refused, naming the key to set, where the run's dataset has no validation split."""
    ways, shots, queries = ways or config.ways, shots or config.shots, queries or config.eval_queries
    if config.task == "regression":
        validation = get_tasksets(config.dataset, ways, shots, queries, eval_seed=config.eval_seed).validation
        if validation is None:
            raise ConfigError(f"dataset {config.dataset!r} has no validation tasks")
        return _placed(config, validation)
    splits = dataset_splits(config.dataset, config.data_options())
    if "validation" not in splits:
        raise ConfigError(f"this run has no validation split: {config.dataset!r} was read with "
                          f"validation_characters: {config.validation_characters}. What is fitted after training is "
                          "fitted on validation episodes, never on test ones: train with validation_characters > 0 "
                          "(e.g. 100: the classes, on omniglot the characters, carved out of meta-training)")
    return _placed(config, EpisodeSampler(splits["validation"], ways, shots, queries, seed=config.eval_seed))


def _check_cross_domain(config: Config, dataset: str) -> None:
    """A run's model can be tested on `dataset` only if the task kind and the input shape agree."""
    try:
        info, _ = dataset_info(dataset)
    except ValueError as e:
        raise ConfigError(f"--dataset: {e}") from None
    if info.regression or config.task == "regression":
        raise ConfigError(f"a {config.task} run on {config.dataset!r} cannot be tested on {dataset!r} "
                          f"({'regression' if info.regression else 'classification'}): the task kinds differ")
    options = replace(config.data_options(), validation=0)
    theirs = info.input_shape(dataset_info(dataset)[1], options)
    ours = input_shape(config)
    if theirs != ours:
        raise ConfigError(f"the model of this run takes inputs of shape {'x'.join(map(str, ours))} (trained on "
                          f"{config.dataset!r}); {dataset!r} gives {'x'.join(map(str, theirs))}. Cross-domain "
                          f"evaluation needs inputs of the same shape (a folder dataset is decoded at the run's "
                          f"image_size and channels)")


def _placed(config: Config, source: TaskSource) -> TaskSource:
    """`source` delivering its episodes on the config's device (unchanged on the CPU)."""
    device = resolve_device(config.device)
    return source if device.type == "cpu" else DeviceTasks(source, device)


def _pretraining_batches(config: Config, dataset: Any) -> ClassBatchSampler:
    """Baseline's pre-training batches: `train_ways` classes x `train_shots` images each, global labels."""
    batches = ClassBatchSampler(dataset, config.effective_train_ways, config.effective_train_shots, seed=config.seed)
    if batches.num_classes != baseline_classes(config):
        raise ValueError(f"the {config.dataset} training split has {batches.num_classes} classes, Baseline's head "
                         f"{baseline_classes(config)} (Omniglot: 1200 characters x 4 rotations, less validation)")
    return batches


def build_experiment(config: Config) -> Experiment:
    """The learner and task sources for `config`; loads the dataset (errors name the missing files)."""
    learner = build_learner(config)
    if config.task == "regression":
        train = get_tasksets(config.dataset, config.ways, config.effective_train_shots, config.queries,
                             seed=config.seed).train
        validation = get_tasksets(config.dataset, config.ways, config.shots, config.eval_queries,
                                  eval_seed=config.eval_seed).validation
        return Experiment(learner, _placed(config, train),
                          _placed(config, validation) if config.validation_every and validation else None,
                          test_source(config))
    splits = dataset_splits(config.dataset, config.data_options())
    if config.algorithm == "baseline":
        train = _pretraining_batches(config, splits["train"])
    else:
        train = EpisodeSampler(splits["train"], config.effective_train_ways, config.effective_train_shots, config.queries,
                               seed=config.seed)
    if config.validation_every and "validation" not in splits:
        raise ConfigError(f"validation_every > 0, but dataset {config.dataset!r} has no validation split here: "
                          "set validation_characters (the classes carved out of meta-training; characters on "
                          "omniglot), e.g. 100")
    validation = (EpisodeSampler(splits["validation"], config.ways, config.shots, config.eval_queries, seed=config.eval_seed)
                  if "validation" in splits and config.validation_every else None)
    return Experiment(learner, _placed(config, train), None if validation is None else _placed(config, validation),
                      test_source(config, splits=splits))
