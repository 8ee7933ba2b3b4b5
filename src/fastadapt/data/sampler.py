"""N-way K-shot Q-query episode sampling over any labelled dataset, deterministic from (seed, index)."""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from .episodes import Episode, TaskBatch

__all__ = ["TaskSource", "EpisodeSampler", "ClassBatchSampler", "DeviceTasks", "episode_rng"]


class TaskSource(Protocol):
    """Anything that yields episode `i` as a pure function of its seed and `i` (samplers, sinusoid)."""

    seed: int

    def episode(self, index: int) -> Episode: ...

    def task_batch(self, start: int, size: int) -> TaskBatch: ...


def episode_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of episode `index`: the same on every run, process and machine.

    Example:
        >>> bool(episode_rng(0, 3).integers(100) == episode_rng(0, 3).integers(100))
        True
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and episode index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([seed, index])


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class EpisodeSampler:
    """Samples N-way K-shot Q-query classification episodes from a labelled dataset.

    The class index is built once. Episode `i` draws `ways` distinct classes and, per class,
    `shots + queries` distinct examples, all from `episode_rng(seed, i)`; the chosen classes get
    labels 0..ways-1 in the (random) order they were drawn. Support and query never share an example.

    `dataset` is anything with `__len__` and `__getitem__` returning `(x, label)`; an
    `ImageClassDataset` (or anything with `labels` and `gather(indices)`) is served in one batched op.

    Example:
        >>> from fastadapt.data import ImageClassDataset
        >>> ds = ImageClassDataset(torch.zeros(40, 1, 8, 8, dtype=torch.uint8), torch.arange(40) // 4)
        >>> ep = EpisodeSampler(ds, ways=5, shots=1, queries=3, seed=0).episode(0)
        >>> ep.support_x.shape, ep.query_y.tolist()[:4]
        (torch.Size([5, 1, 8, 8]), [0, 0, 0, 1])
    """

    def __init__(self, dataset: Any, ways: int, shots: int, queries: int, seed: int = 0) -> None:
        self.ways = _positive("ways", ways)
        self.shots = _positive("shots", shots)
        self.queries = _positive("queries", queries)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.dataset = dataset
        classes, self._members, counts = _class_index(_labels_of(dataset))
        if self.ways > len(classes):
            raise ValueError(f"ways={self.ways} exceeds the {len(classes)} classes available in the dataset")
        need = self.shots + self.queries
        smallest = int(counts.argmin())
        if need > counts[smallest]:
            raise ValueError(
                f"shots + queries = {self.shots} + {self.queries} = {need} exceeds the {int(counts[smallest])} "
                f"examples of class {classes[smallest].item()!r} (every class needs at least {need})"
            )

    @property
    def classes(self) -> int:
        """How many classes the dataset has."""
        return len(self._members)

    def episode_classes(self, index: int) -> np.ndarray:
        """The class positions (in the sorted distinct labels) episode `index` draws, in label order 0..ways-1."""
        return episode_rng(self.seed, index).choice(len(self._members), size=self.ways, replace=False)

    def episode_indices(self, index: int) -> tuple[Tensor, Tensor]:
        """Dataset indices of episode `index`: support `(ways*shots,)` and query `(ways*queries,)`, class-major."""
        rng = episode_rng(self.seed, index)
        chosen = rng.choice(len(self._members), size=self.ways, replace=False)
        need = self.shots + self.queries
        picks = np.stack([rng.choice(self._members[c], size=need, replace=False) for c in chosen])
        return torch.from_numpy(picks[:, : self.shots].reshape(-1)), torch.from_numpy(picks[:, self.shots :].reshape(-1))

    def outside_examples(self, index: int, count: int, rng: np.random.Generator) -> Tensor:
        """Inputs of `count` examples from `count` distinct classes that episode `index` does not use
        (outliers for its support set), drawn from `rng`."""
        inside = set(self.episode_classes(index).tolist())
        others = np.array([c for c in range(len(self._members)) if c not in inside])
        if count > len(others):
            raise ValueError(f"{count} outliers need {count} classes outside the episode; the dataset has {len(others)}")
        classes = rng.choice(others, size=count, replace=False)
        return _gather(self.dataset, torch.from_numpy(np.array([rng.choice(self._members[c]) for c in classes])))

    def episode(self, index: int) -> Episode:
        """Episode `index` (a pure function of the seed and `index`)."""
        return self.task_batch(index, 1)[0]

    def task_batch(self, start: int, size: int) -> TaskBatch:
        """Episodes `start .. start+size-1` stacked into a `TaskBatch`, gathered in one op."""
        pairs = [self.episode_indices(i) for i in range(start, start + size)]
        support = torch.stack([s for s, _ in pairs])
        query = torch.stack([q for _, q in pairs])
        every = torch.cat([support.reshape(-1), query.reshape(-1)])
        x = _gather(self.dataset, every)
        n_support = support.numel()
        support_y = torch.arange(self.ways).repeat_interleave(self.shots).expand(size, -1)
        query_y = torch.arange(self.ways).repeat_interleave(self.queries).expand(size, -1)
        return TaskBatch(
            x[:n_support].reshape(size, support.shape[1], *x.shape[1:]),
            support_y.contiguous(),
            x[n_support:].reshape(size, query.shape[1], *x.shape[1:]),
            query_y.contiguous(),
        )


class ClassBatchSampler:
    """Class-balanced supervised batches with global labels, for pre-training (e.g. `Baseline`).

    Batch `i` draws `classes` distinct classes and `per_class` distinct examples of each, all from
    `episode_rng(seed, i)`. Its labels are global: each class's index among the dataset's sorted
    distinct labels (for an `ImageClassDataset`, whose labels are 0..C-1, the labels themselves).
    `task_batch(start, size)` stacks batches `start .. start+size-1` as a `TaskBatch` whose
    support set is the batch and whose query set is empty, so a trainer that draws task batches
    draws these unchanged, reproducibly from the seed.

    Example:
        >>> from fastadapt.data import ImageClassDataset
        >>> ds = ImageClassDataset(torch.zeros(40, 1, 8, 8, dtype=torch.uint8), torch.arange(40) // 4)
        >>> batch = ClassBatchSampler(ds, classes=3, per_class=2, seed=0).task_batch(0, 1)
        >>> batch.support_x.shape, batch.query_x.shape[1], batch.support_y.unique().numel()
        (torch.Size([1, 6, 1, 8, 8]), 0, 3)
    """

    def __init__(self, dataset: Any, classes: int, per_class: int, seed: int = 0) -> None:
        self.classes = _positive("classes", classes)
        self.per_class = _positive("per_class", per_class)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.dataset = dataset
        labels, self._members, counts = _class_index(_labels_of(dataset))
        self.num_classes = len(labels)
        if self.classes > self.num_classes:
            raise ValueError(f"classes={self.classes} exceeds the {self.num_classes} classes available in the dataset")
        smallest = int(counts.argmin())
        if self.per_class > counts[smallest]:
            raise ValueError(f"per_class={self.per_class} exceeds the {int(counts[smallest])} examples of class "
                             f"{labels[smallest].item()!r} (every class needs at least {self.per_class})")

    def batch_indices(self, index: int) -> tuple[Tensor, Tensor]:
        """Dataset indices `(classes*per_class,)` of batch `index`, class-major, and their global labels."""
        rng = episode_rng(self.seed, index)
        chosen = rng.choice(self.num_classes, size=self.classes, replace=False)
        picks = np.stack([rng.choice(self._members[c], size=self.per_class, replace=False) for c in chosen])
        return torch.from_numpy(picks.reshape(-1)), torch.from_numpy(chosen).repeat_interleave(self.per_class)

    def episode(self, index: int) -> Episode:
        """Batch `index` as an `Episode` with an empty query set."""
        return self.task_batch(index, 1)[0]

    def task_batch(self, start: int, size: int) -> TaskBatch:
        """Batches `start .. start+size-1` stacked: support `(size, classes*per_class, ...)`, empty query."""
        pairs = [self.batch_indices(i) for i in range(start, start + size)]
        x = _gather(self.dataset, torch.cat([i for i, _ in pairs]))
        x = x.reshape(size, self.classes * self.per_class, *x.shape[1:])
        y = torch.stack([labels for _, labels in pairs])
        return TaskBatch(x, y, x[:, :0], y[:, :0])


class DeviceTasks:
    """A task source whose episodes arrive on `device` (drawn as `source` draws them, then moved).

    Episodes are sampled on the CPU from the seed, so they are the same episodes on every device.

    Example:
        >>> from fastadapt.data import SinusoidTasks
        >>> DeviceTasks(SinusoidTasks(seed=3), "cpu").task_batch(0, 2).support_x.device.type
        'cpu'
    """

    def __init__(self, source: TaskSource, device: torch.device | str) -> None:
        self.source = source
        self.device = torch.device(device)
        self.seed = source.seed

    def episode(self, index: int) -> Episode:
        """Episode `index` of the source, on the device."""
        return self.source.episode(index).to(self.device)

    def task_batch(self, start: int, size: int) -> TaskBatch:
        """Episodes `start .. start+size-1` of the source, stacked, on the device."""
        return self.source.task_batch(start, size).to(self.device)


def _class_index(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Sorted distinct labels, the dataset indices of each, and their counts."""
    classes, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(classes))
    return classes, np.split(order, np.cumsum(counts)[:-1]), counts


_scanned_labels: "weakref.WeakKeyDictionary[Any, np.ndarray]" = weakref.WeakKeyDictionary()


def _labels_of(dataset: Any) -> np.ndarray:
    """Every item's label without decoding an item where the dataset says them: `.labels`, else
    `.targets` (torchvision's convention); else one pass over the items, remembered per dataset."""
    labels = next((getattr(dataset, name) for name in ("labels", "targets") if getattr(dataset, name, None) is not None),
                  None)
    if labels is None:
        try:
            return _scanned_labels[dataset]
        except (KeyError, TypeError):
            labels = _checked_labels(dataset, [int(dataset[i][1]) for i in range(len(dataset))])
        try:
            _scanned_labels[dataset] = labels
        except TypeError:  # not weak-referenceable: scanned again next time
            pass
        return labels
    return _checked_labels(dataset, labels)


def _checked_labels(dataset: Any, labels: Any) -> np.ndarray:
    labels = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"dataset labels must be a non-empty 1-d sequence, got shape {labels.shape}")
    if len(labels) != len(dataset):
        raise ValueError(f"the dataset's labels (.labels / .targets) number {len(labels)}, but it has {len(dataset)} items")
    return labels


def _gather(dataset: Any, indices: Tensor) -> Tensor:
    if hasattr(dataset, "gather"):
        return dataset.gather(indices)
    return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in indices])
