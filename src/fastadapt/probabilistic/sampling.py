"""Explicit randomness for sampling learners: every draw is a pure function of a seed and keys.

Training draws from `(seed, step, task)` (the learner counts its steps in a buffer that
checkpoints keep, so a resumed run draws what the uninterrupted one drew); evaluation draws from
`(seed, a checksum of the task's support set)`, so an episode's samples do not depend on the order
or the threads it was evaluated in, nor on the batch it came in.

Example:
    >>> a = gaussian_noise({"w": torch.zeros(2)}, 3, generator(0, 1, 2))
    >>> torch.equal(a["w"], gaussian_noise({"w": torch.zeros(2)}, 3, generator(0, 1, 2))["w"])
    True
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor

from ..functional import Params

__all__ = ["generator", "task_checksum", "gaussian_noise", "TRAINING", "EVALUATION"]

TRAINING, EVALUATION = 0, 1  # stream tags: training and evaluation never share a draw


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from `(seed, *keys)` (numpy's SeedSequence mixes them).

    Example:
        >>> torch.rand(1, generator=generator(0, 1)).item() == torch.rand(1, generator=generator(0, 2)).item()
        False
    """
    state = np.random.SeedSequence([int(seed), *(int(k) for k in keys)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def task_checksum(*tensors: Tensor) -> int:
    """A CRC-32 of the tensors' bytes (copied to the CPU): the key of an evaluation episode.

    Example:
        >>> task_checksum(torch.zeros(2)) == task_checksum(torch.zeros(2)), task_checksum(torch.ones(2)) == task_checksum(torch.zeros(2))
        (True, False)
    """
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes(), crc)
    return crc


def gaussian_noise(like: Params, samples: int, gen: torch.Generator) -> dict[str, Tensor]:
    """Standard normal noise `(samples, *p.shape)` per tensor of `like` (drawn on the CPU in the
    names' order, then moved to `like`'s device and dtype)."""
    return {name: torch.randn(samples, *p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
            for name, p in like.items()}
