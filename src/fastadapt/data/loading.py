"""Task batches drawn ahead of use by `torch.utils.data.DataLoader` worker processes, for datasets that
decode their items lazily (images read from disk in `__getitem__`).

Batch k holds episodes `(first + k) * size ... (first + k + 1) * size - 1` of the source, and every
episode is a pure function of (seed, index): the batches are the same for any number of workers,
in the same order.

Example:
    >>> from fastadapt.data import SinusoidTasks
    >>> batches = list(task_batches(SinusoidTasks(seed=0), size=4, first=2, count=3))
    >>> len(batches), bool((batches[0].support_x == SinusoidTasks(seed=0).task_batch(8, 4).support_x).all())
    (3, True)
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .episodes import TaskBatch
from .sampler import DeviceTasks, TaskSource

__all__ = ["task_batches"]


class _TaskBatchAt(Dataset):
    """Item k: task batch `first + k` of `source` (`size` episodes)."""

    def __init__(self, source: TaskSource, size: int, first: int, count: int) -> None:
        self.source, self.size, self.first, self.count = source, size, first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> TaskBatch:
        return self.source.task_batch((self.first + k) * self.size, self.size)


def task_batches(source: TaskSource, size: int, first: int, count: int, workers: int = 0) -> Iterator[TaskBatch]:
    """Task batches `first, first + 1, ...` (`count` of them, `size` episodes each). With `workers`
    > 0 they are drawn in that many processes, up to two batches per worker ahead of use; with 0, in
    this process when asked. A `DeviceTasks` source is drawn on the CPU and moved here."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    device = None
    if isinstance(source, DeviceTasks):  # workers draw on the CPU; the move to a GPU happens here
        source, device = source.source, source.device
    batches = _TaskBatchAt(source, size, first, count)
    if workers == 0:
        for k in range(count):
            yield batches[k] if device is None else batches[k].to(device)
        return
    loader = DataLoader(batches, batch_size=None, shuffle=False,
                        num_workers=workers, collate_fn=_as_is, prefetch_factor=2,  # one thread per worker
                        # its own generator: the workers' seeds are not drawn from (and do not move) torch's
                        # global random state, which a run checkpoints; episodes do not use them
                        generator=torch.Generator().manual_seed(0))
    for batch in loader:
        yield batch if device is None else batch.to(device)


def _as_is(batch: TaskBatch) -> TaskBatch:
    return batch
