"""Regression task families, built in (no files): the MAML paper's sinusoids (Finn et al. 2017) and
the ambiguous sines-and-lines family of PLATIPUS (Finn, Xu & Levine 2018)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .episodes import Episode, TaskBatch
from .sampler import _positive, episode_rng

__all__ = ["SinusoidTasks", "SinesAndLinesTasks"]


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


class SinesAndLinesTasks(SinusoidTasks):
    """Ambiguous tasks (PLATIPUS, Finn et al. 2018): each task is, with probability 1/2, a sinusoid
    `A sin(x - phi)` (A ~ U[0.1, 5], phi ~ U[0, pi]) or a line `a x + b` (a, b ~ U[-3, 3]), its
    targets with Gaussian noise of standard deviation 0.3; x ~ U[-5, 5]. From one or two support
    points both explanations fit: a calibrated learner's samples should cover both.

    Example:
        >>> SinesAndLinesTasks(shots=2, queries=5).task_batch(0, 3).support_y.shape
        torch.Size([3, 2, 1])
    """

    slope = (-3.0, 3.0)
    intercept = (-3.0, 3.0)
    noise = 0.3

    def _draw(self, index: int) -> np.ndarray:
        rng = episode_rng(self.seed, index)
        is_sine = rng.uniform() < 0.5
        first, second = (rng.uniform(*self.amplitude), rng.uniform(*self.phase)) if is_sine else (
            rng.uniform(*self.slope), rng.uniform(*self.intercept))
        x = rng.uniform(*self.x_range, size=self.shots + self.queries)
        clean = first * np.sin(x - second) if is_sine else first * x + second
        return np.stack([x, clean + self.noise * rng.standard_normal(x.shape)], axis=-1)
