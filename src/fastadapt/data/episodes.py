"""The data model: one few-shot task (`Episode`) and T tasks stacked on a leading dim (`TaskBatch`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["Episode", "TaskBatch"]


@dataclass(frozen=True)
class Episode:
    """One task: a support set to adapt on and a query set to evaluate on.

    Example:
        >>> ep = Episode(torch.zeros(5, 1), torch.zeros(5), torch.zeros(10, 1), torch.zeros(10))
        >>> ep.support_x.shape
        torch.Size([5, 1])
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Episode":
        """Moves the tensors; `dtype` applies to the inputs `x` only (labels keep theirs)."""
        return _moved(self, device, dtype)


@dataclass(frozen=True)
class TaskBatch:
    """T episodes stacked: support x `(T, N*K, ...)`, support y `(T, N*K)`, query x `(T, N*Q, ...)`.

    Example:
        >>> ep = Episode(torch.zeros(5, 1), torch.zeros(5), torch.zeros(10, 1), torch.zeros(10))
        >>> TaskBatch.stack([ep, ep]).support_x.shape
        torch.Size([2, 5, 1])
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        sizes = {t.shape[0] for t in (self.support_x, self.support_y, self.query_x, self.query_y)}
        if len(sizes) != 1:
            raise ValueError(f"TaskBatch tensors disagree on the number of tasks (leading dim): {sorted(sizes)}")
        if self.support_x.shape[:2] != self.support_y.shape[:2] or self.query_x.shape[:2] != self.query_y.shape[:2]:
            raise ValueError(
                "TaskBatch x and y disagree on examples per task: support "
                f"{tuple(self.support_x.shape[:2])} vs {tuple(self.support_y.shape[:2])}, query "
                f"{tuple(self.query_x.shape[:2])} vs {tuple(self.query_y.shape[:2])}"
            )

    @classmethod
    def stack(cls, episodes: Sequence[Episode]) -> "TaskBatch":
        """Stacks episodes of identical shapes into one batch."""
        if not episodes:
            raise ValueError("TaskBatch.stack needs at least one episode, got an empty sequence")
        return cls(*(torch.stack([getattr(e, f) for e in episodes]) for f in _FIELDS))

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def __getitem__(self, task: int) -> Episode:
        return Episode(self.support_x[task], self.support_y[task], self.query_x[task], self.query_y[task])

    def split(self, size: int) -> list["TaskBatch"]:
        """Consecutive groups of at most `size` tasks (views, no copies)."""
        return [TaskBatch(*(getattr(self, f)[i:i + size] for f in _FIELDS)) for i in range(0, len(self), size)]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TaskBatch":
        """Moves the tensors; `dtype` applies to the inputs `x` only (labels keep theirs)."""
        return _moved(self, device, dtype)


_FIELDS = ("support_x", "support_y", "query_x", "query_y")


def _moved(item: Any, device: torch.device | str | None, dtype: torch.dtype | None) -> Any:
    return type(item)(
        item.support_x.to(device=device, dtype=dtype),
        item.support_y.to(device=device),
        item.query_x.to(device=device, dtype=dtype),
        item.query_y.to(device=device),
    )
