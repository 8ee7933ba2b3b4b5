"""Datasets by name: each name maps to the literature's splits and defaults, for recipes, the
command line and Python alike (in the spirit of learn2learn's `get_tasksets`).

| name | classes per split | images |
| --- | --- | --- |
| `omniglot` | 4800 train (1200 characters x 4 rotations), 423 test; validation carved from train | 1x28x28 |
| `mnist` | the 10 digits in train (60,000 images) and test (10,000 images) | 1x28x28 |
| `mini-imagenet` | 64 train, 16 validation, 20 test (Ravi & Larochelle's CSV files), 600 images each | 3x84x84 |
| `folder:PATH` | one sub-folder per class; split by `train/` `val/` `test/` sub-folders, by split files, or by a seed | any size, grey or RGB, resized to `image_size` |
| `sinusoid` | regression tasks, no files | x in [-5, 5] |
| `sines-lines` | ambiguous regression tasks: half sines, half lines, noise 0.3 (PLATIPUS), no files | x in [-5, 5] |

`dataset_splits(name)` returns the splits as datasets; `get_tasksets(name, ways, shots, queries)`
returns episode samplers over them. `register_dataset` adds a name of your own.

Example:
    >>> tasks = get_tasksets("sinusoid", ways=1, shots=5, queries=5)
    >>> tasks.train.task_batch(0, 2).support_x.shape
    torch.Size([2, 5, 1])
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from .sampler import EpisodeSampler, TaskSource
from .sinusoid import SinesAndLinesTasks, SinusoidTasks

__all__ = ["DataOptions", "DatasetInfo", "TaskSets", "dataset_info", "dataset_names", "dataset_splits",
           "get_tasksets", "register_dataset"]

# Sinusoid validation and test tasks come from seeds far from any training seed.
SINUSOID_VALIDATION_SEED = 20_000
SINUSOID_TEST_SEED = 10_000


@dataclass(frozen=True)
class DataOptions:
    """How a dataset is read: where, at which size, with how many validation classes.

    `image_size` / `channels`: None keeps the dataset's own (28 / 1 for Omniglot and MNIST).
    `validation`: classes (Omniglot: characters) carved out of meta-training for validation.
    """

    root: str | os.PathLike[str] | None = None
    image_size: int | None = None
    channels: int | None = None
    validation: int = 0
    split_seed: int = 0
    download: bool = False


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset: how to build its splits and the shape of one input.

    `splits(argument, options)` returns `{"train", "test"[, "validation"]}` datasets (anything
    `EpisodeSampler` takes); `argument` is what follows the colon in `name:argument` (a folder
    path for `folder:PATH`), else None. `input_shape(argument, options)` is one example's shape.
    """

    name: str
    summary: str
    splits: Callable[[str | None, DataOptions], dict[str, Any]]
    input_shape: Callable[[str | None, DataOptions], tuple[int, ...]]
    regression: bool = False
    takes_argument: bool = False


_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> None:
    """Adds (or replaces) a dataset name.

    Example:
        >>> import torch
        >>> from fastadapt.data import ImageClassDataset
        >>> toy = ImageClassDataset(torch.zeros(40, 1, 8, 8, dtype=torch.uint8), torch.arange(40) // 4)
        >>> register_dataset(DatasetInfo("toy", "ten classes", lambda arg, o: {"train": toy, "test": toy},
        ...                              lambda arg, o: (1, 8, 8)))
        >>> get_tasksets("toy", ways=5, shots=1, queries=3).test.task_batch(0, 1).query_x.shape
        torch.Size([1, 15, 1, 8, 8])
    """
    if not info.name or ":" in info.name:
        raise ValueError(f"a dataset name must be non-empty and without ':', got {info.name!r}")
    _REGISTRY[info.name] = info


def dataset_names() -> list[str]:
    """The registered names (`folder` is written `folder:PATH`)."""
    return sorted(_REGISTRY)


def dataset_info(spec: str) -> tuple[DatasetInfo, str | None]:
    """The entry for `spec` (`name` or `name:argument`) and its argument; a clear error otherwise.

    Example:
        >>> dataset_info("mnist")[0].name
        'mnist'
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a dataset is named by a string such as 'omniglot', got {spec!r}")
    name, colon, argument = spec.partition(":")
    info = _REGISTRY.get(name)
    if info is None:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown dataset {spec!r}{hint}; known: {', '.join(_describe_names())}")
    if info.takes_argument and not argument:
        raise ValueError(f"dataset {name!r} needs an argument: {name}:PATH, got {spec!r}")
    if not info.takes_argument and colon:
        raise ValueError(f"dataset {name!r} takes no argument after ':', got {spec!r}")
    return info, argument or None


def _describe_names() -> list[str]:
    return [f"{n}:PATH" if _REGISTRY[n].takes_argument else n for n in dataset_names()]


def dataset_splits(spec: str, options: DataOptions = DataOptions()) -> dict[str, Any]:
    """The splits of dataset `spec`: `{"train", "test"}` and `"validation"` where asked for.

    Example:
        >>> splits = dataset_splits("omniglot", DataOptions(root="/data", validation=100))  # doctest: +SKIP
        >>> sorted(splits)  # doctest: +SKIP
        ['test', 'train', 'validation']
    """
    info, argument = dataset_info(spec)
    if info.regression:
        raise ValueError(f"dataset {spec!r} is a family of regression tasks, not a labelled dataset: use get_tasksets")
    return info.splits(argument, options)


@dataclass(frozen=True)
class TaskSets:
    """Episode sources of one dataset: training, validation (None without one) and test."""

    train: TaskSource
    validation: TaskSource | None
    test: TaskSource


def get_tasksets(spec: str, ways: int, shots: int, queries: int, *, seed: int = 0, eval_seed: int = 0,
                 eval_queries: int | None = None, options: DataOptions = DataOptions()) -> TaskSets:
    """N-way K-shot episode sources over the splits of `spec`: training episodes from `seed`,
    validation and test episodes from `eval_seed` (fixed episodes: every method meets the same ones),
    with `eval_queries` query examples per class (default `queries`).

    Example:
        >>> tasks = get_tasksets("omniglot", ways=5, shots=1, queries=15, options=DataOptions(root="/data"))  # doctest: +SKIP
        >>> tasks.test.task_batch(0, 4).support_x.shape  # doctest: +SKIP
        torch.Size([4, 5, 1, 28, 28])
    """
    eval_queries = eval_queries or queries
    info, _ = dataset_info(spec)
    if info.regression:
        family = _TASK_FAMILIES[info.name]
        validation = family(shots, eval_queries, seed=SINUSOID_VALIDATION_SEED + eval_seed)
        return TaskSets(family(shots, queries, seed=seed), validation,
                        family(shots, eval_queries, seed=SINUSOID_TEST_SEED + eval_seed))
    splits = dataset_splits(spec, options)
    validation = splits.get("validation")
    return TaskSets(EpisodeSampler(splits["train"], ways, shots, queries, seed=seed),
                    None if validation is None else EpisodeSampler(validation, ways, shots, eval_queries, seed=eval_seed),
                    EpisodeSampler(splits["test"], ways, shots, eval_queries, seed=eval_seed))


def _native_only(name: str, options: DataOptions, size: int, channels: int) -> None:
    """Omniglot and MNIST come at one size and channel count here; other values are refused."""
    if options.channels not in (None, channels):
        raise ValueError(f"dataset {name!r} has {channels} channel(s), got channels={options.channels}")
    if options.image_size is not None and name == "mnist" and options.image_size != size:
        raise ValueError(f"dataset 'mnist' is {size}x{size}, got image_size={options.image_size}")


def _omniglot(argument: str | None, options: DataOptions) -> dict[str, Any]:
    from .omniglot import omniglot_splits

    _native_only("omniglot", options, 28, 1)
    return omniglot_splits(options.root, image_size=options.image_size or 28, validation_characters=options.validation,
                           split_seed=options.split_seed, download=options.download)


def _mnist(argument: str | None, options: DataOptions) -> dict[str, Any]:
    from .mnist import mnist_splits

    _native_only("mnist", options, 28, 1)
    if options.validation:
        raise ValueError(f"dataset 'mnist' has no validation split (10 classes, shared by train and test), "
                         f"got validation={options.validation}")
    return mnist_splits(options.root, download=options.download)


register_dataset(DatasetInfo("omniglot", "1623 handwritten characters (Lake et al. 2015), the standard 1200/423 split",
                             _omniglot, lambda argument, o: (1, o.image_size or 28, o.image_size or 28)))
register_dataset(DatasetInfo("mnist", "the ten digits, original IDX files; for cross-domain evaluation", _mnist,
                             lambda argument, o: (1, 28, 28)))
def _mini_imagenet(argument: str | None, options: DataOptions) -> dict[str, Any]:
    from .mini_imagenet import mini_imagenet_splits

    if options.channels not in (None, 3):
        raise ValueError(f"dataset 'mini-imagenet' is RGB (3 channels), got channels={options.channels}")
    if options.validation:
        raise ValueError("dataset 'mini-imagenet' has its own validation split (16 classes); leave validation at 0, "
                         f"got {options.validation}")
    return mini_imagenet_splits(options.root, image_size=options.image_size or 84)


def _folder(argument: str | None, options: DataOptions) -> dict[str, Any]:
    from .folder import folder_splits

    return folder_splits(argument or "", image_size=options.image_size, channels=options.channels,
                         validation=options.validation, split_seed=options.split_seed)


def _folder_shape(argument: str | None, options: DataOptions) -> tuple[int, ...]:
    """Known without decoding only where the options fix it; else from the decoded training split."""
    if options.image_size is not None and options.channels is not None:
        return (options.channels, options.image_size, options.image_size)
    return tuple(_folder(argument, options)["train"].images.shape[1:])


register_dataset(DatasetInfo("mini-imagenet", "100 ImageNet classes at 84x84, Ravi & Larochelle's split",
                             _mini_imagenet, lambda argument, o: (3, o.image_size or 84, o.image_size or 84)))
register_dataset(DatasetInfo("folder", "your images: one sub-folder per class", _folder, _folder_shape,
                             takes_argument=True))
register_dataset(DatasetInfo("sinusoid", "sine regression tasks (Finn et al. 2017), no files",
                             lambda argument, o: {}, lambda argument, o: (1,), regression=True))
register_dataset(DatasetInfo("sines-lines", "ambiguous regression tasks, half sines, half lines, noisy (PLATIPUS), "
                             "no files", lambda argument, o: {}, lambda argument, o: (1,), regression=True))
# the task family behind each regression dataset
_TASK_FAMILIES = {"sinusoid": SinusoidTasks, "sines-lines": SinesAndLinesTasks}
