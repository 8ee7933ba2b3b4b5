"""Label noise in support sets, the three kinds of the noisy few-shot literature (e.g. Liang et al.
2022), at a given rate, with the true class keeping a plurality of every label:

- `symmetric`: in every class, `m = rate * shots` support examples take the label of another
  class, spread as evenly as possible over the other classes (a random exchange: in a random order
  of the classes, class i's j-th picked example goes `1 + (j + r) mod (ways - 1)` places after it,
  cyclically, r random), so every label receives `m` examples, at most `ceil(m / (ways - 1))` from
  any one other class;
- `pair`: class c's `m` picked examples take label c+1 (mod ways), as a fixed confusion;
- `outlier`: class c's `m` picked examples are replaced by images of classes outside the episode
  (one class each), keeping label c.

Every label still has `shots` examples, `shots - m` of its own class; the true class keeps a
plurality when that beats the most any one other source gives it (pair: `m`, symmetric:
`ceil(m / (ways - 1))`, outlier: 1): 5-shot episodes allow pair noise at 0.2 and 0.4, symmetric
and outlier noise up to 0.6; 1- and 2-shot episodes allow none. The rate must be a whole number of shots (`m / shots`); another one,
or one that loses the plurality, is refused.

Example:
    >>> import torch
    >>> from fastadapt.data import EpisodeSampler, ImageClassDataset
    >>> data = ImageClassDataset(torch.zeros(200, 1, 8, 8, dtype=torch.uint8), torch.arange(200) // 10)
    >>> noisy = NoisyLabels(EpisodeSampler(data, ways=5, shots=5, queries=2, seed=0), "pair", 0.4)
    >>> noisy.noisy_per_class, noisy.task_batch(0, 2).support_y.shape
    (2, torch.Size([2, 25]))
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..data.episodes import Episode, TaskBatch
from ..data.sampler import EpisodeSampler

__all__ = ["NOISE_KINDS", "NoisyLabels", "noisy_per_class"]

NOISE_KINDS = ("symmetric", "pair", "outlier")
_NOISE_STREAM = 4  # the third key of the noise's seed sequence, apart from the episode's own draws


def _largest_other(kind: str, noisy: int, ways: int) -> int:
    """The most examples one other source gives a label with `noisy` noisy examples per class."""
    if kind == "pair":
        return noisy
    if kind == "symmetric":
        return -(-noisy // (ways - 1))
    return 1 if noisy else 0


def allowed_rates(kind: str, shots: int, ways: int) -> list[float]:
    """The rates of `kind` noise above 0 at which the true class keeps a plurality.

    Example:
        >>> allowed_rates("pair", 5, 5), allowed_rates("symmetric", 5, 5)
        ([0.2, 0.4], [0.2, 0.4, 0.6])
    """
    return [m / shots for m in range(1, shots) if shots - m > _largest_other(kind, m, ways)]


def noisy_per_class(rate: float, shots: int, kind: str, ways: int) -> int:
    """How many of a class's `shots` support examples are noisy at `rate` for `kind` noise in
    `ways`-way episodes, refused where the true class would lose its plurality.

    Example:
        >>> noisy_per_class(0.4, 5, "pair", 5), noisy_per_class(0.6, 5, "symmetric", 5)
        (2, 3)
    """
    if not (isinstance(rate, (int, float)) and 0 <= rate <= 1):
        raise ValueError(f"a label-noise rate must be a number in [0, 1], got {rate!r}")
    if ways < 2:
        raise ValueError(f"label noise needs episodes of at least 2 ways, got {ways}")
    noisy = round(rate * shots)
    allowed = ", ".join(f"{r:g}" for r in allowed_rates(kind, shots, ways)) or "none"
    if abs(rate * shots - noisy) > 1e-9:
        raise ValueError(f"rate {rate} is not a whole number of the {shots} shots ({rate * shots:g} examples per "
                         f"class); {kind} rates with the true class keeping a plurality: {allowed}")
    if noisy and shots - noisy <= _largest_other(kind, noisy, ways):
        raise ValueError(f"rate {rate} makes {noisy} of {shots} shots noisy: with {kind} noise the true class would "
                         f"not keep a plurality ({shots - noisy} of its own against up to "
                         f"{_largest_other(kind, noisy, ways)} from another source); {kind} rates that keep it: {allowed}")
    return noisy


class NoisyLabels:
    """A task source: the episodes of `sampler` with label noise of `kind` in their support sets
    (queries stay clean), the noise of episode `i` drawn from (seed, i): the same for any batch.
    """

    def __init__(self, sampler: EpisodeSampler, kind: str, rate: float) -> None:
        if kind not in NOISE_KINDS:
            raise ValueError(f"label-noise kind must be one of {', '.join(NOISE_KINDS)}, got {kind!r}")
        self.sampler, self.kind, self.rate = sampler, kind, rate
        self.noisy_per_class = noisy_per_class(rate, sampler.shots, kind, sampler.ways)
        self.seed = sampler.seed
        outside = sampler.classes - sampler.ways
        if kind == "outlier" and sampler.ways * self.noisy_per_class > outside:
            raise ValueError(f"outlier noise at {rate} needs {sampler.ways * self.noisy_per_class} classes outside a "
                             f"{sampler.ways}-way episode, one per outlier; the dataset has {outside}")

    def episode(self, index: int) -> Episode:
        """Episode `index`, its support set noisy."""
        return self.task_batch(index, 1)[0]

    def task_batch(self, start: int, size: int) -> TaskBatch:
        """Episodes `start .. start+size-1`, stacked, their support sets noisy."""
        batch = self.sampler.task_batch(start, size)
        if self.noisy_per_class == 0:
            return batch
        support_x, support_y = batch.support_x.clone(), batch.support_y.clone()
        for t in range(size):
            rng = np.random.default_rng([self.seed, start + t, _NOISE_STREAM])
            self._add_noise(support_x[t], support_y[t], rng, start + t)
        return TaskBatch(support_x, support_y, batch.query_x, batch.query_y)

    def _add_noise(self, x: Tensor, y: Tensor, rng: np.random.Generator, index: int) -> None:
        """Noise into one episode's support set `x (N*K, ...)`, `y (N*K,)`, in place."""
        ways, m = self.sampler.ways, self.noisy_per_class
        labels = y.numpy()
        picked = np.stack([rng.choice(np.flatnonzero(labels == c), size=m, replace=False) for c in range(ways)])
        if self.kind == "pair":
            y[torch.from_numpy(picked.reshape(-1))] = torch.from_numpy(np.repeat((np.arange(ways) + 1) % ways, m))
        elif self.kind == "symmetric":
            y[torch.from_numpy(picked.reshape(-1))] = torch.from_numpy(_exchange(ways, m, rng))
        else:
            x[torch.from_numpy(picked.reshape(-1))] = self.sampler.outside_examples(index, ways * m, rng).to(x.dtype)


def _exchange(ways: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """New labels for `m` picked examples of each of `ways` classes (class-major): every label given
    `m` times, none to an example of its own class, at most `ceil(m / (ways - 1))` from any one
    class. In a random order of the classes, class i's j-th example goes to the class
    `1 + (j + r) mod (ways - 1)` places after it (r random): each label receives one example per j.

    Example:
        >>> labels = _exchange(5, 3, np.random.default_rng(0)).reshape(5, 3)
        >>> [sorted(set(row) - {c}) == sorted(row) for c, row in enumerate(labels.tolist())]
        [True, True, True, True, True]
    """
    order, shift = rng.permutation(ways), int(rng.integers(ways - 1))
    position = np.empty(ways, dtype=np.int64)
    position[order] = np.arange(ways)
    offsets = 1 + (np.arange(m) + shift) % (ways - 1)  # (m,)
    return order[(position[:, None] + offsets[None, :]) % ways].reshape(-1)
