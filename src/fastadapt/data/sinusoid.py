"""Sinusoid regression tasks from the MAML paper (Finn et al. 2017), built in: no files."""

from __future__ import annotations

import math

import numpy as np
import torch

from .episodes import Episode, TaskBatch
from .sampler import _positive, episode_rng

__all__ = ["SinusoidTasks"]


class SinusoidTasks:
    """Tasks y = A sin(x - phi) with A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5].

    Episode `i` is a pure function of `(seed, i)`. Inputs and targets have shape `(n, 1)`.

    Example:
        >>> tasks = SinusoidTasks(shots=10, queries=10, seed=0)
        >>> tasks.task_batch(0, 4).support_x.shape
        torch.Size([4, 10, 1])
    """

    amplitude = (0.1, 5.0)
    phase = (0.0, math.pi)
    x_range = (-5.0, 5.0)

    def __init__(self, shots: int = 10, queries: int = 10, seed: int = 0) -> None:
        self.shots = _positive("shots", shots)
        self.queries = _positive("queries", queries)
        episode_rng(seed, 0)  # validates the seed
        self.seed = int(seed)

    def _draw(self, index: int) -> np.ndarray:
        rng = episode_rng(self.seed, index)
        amplitude = rng.uniform(*self.amplitude)
        phase = rng.uniform(*self.phase)
        x = rng.uniform(*self.x_range, size=self.shots + self.queries)
        return np.stack([x, amplitude * np.sin(x - phase)], axis=-1)

    def episode(self, index: int) -> Episode:
        """Episode `index`: `shots` support points and `queries` query points of one sinusoid."""
        return self.task_batch(index, 1)[0]

    def task_batch(self, start: int, size: int) -> TaskBatch:
        """Episodes `start .. start+size-1` stacked into a `TaskBatch`."""
        xy = torch.from_numpy(np.stack([self._draw(i) for i in range(start, start + size)])).float()
        x, y = xy[..., :1], xy[..., 1:]
        s = self.shots
        return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])
