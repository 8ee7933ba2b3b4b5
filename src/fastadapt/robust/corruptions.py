"""Input corruptions in pure torch, five severities each (in the spirit of Hendrycks & Dietterich's
ImageNet-C, scaled to few-shot images in [0, 1]): noise, blur, photometric and geometric changes,
elastic distortion and occlusion.

`corrupt(x, name, severity, generator)` takes images `(..., C, H, W)` in [0, 1] and returns them
corrupted, in [0, 1], the same shape and dtype. Random draws (noise, signs, positions) come from
`generator`, one draw per image: the same generator state gives the same corruption.

Example:
    >>> import torch
    >>> x = torch.rand(4, 1, 28, 28)
    >>> y = corrupt(x, "gaussian_noise", 3, torch.Generator().manual_seed(0))
    >>> y.shape == x.shape, bool(((0 <= y) & (y <= 1)).all()), sorted(CORRUPTIONS)[:3]
    (True, True, ['brightness', 'contrast', 'elastic'])
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.episodes import TaskBatch

__all__ = ["CORRUPTIONS", "SEVERITIES", "WHERE", "check_corruption", "corrupt", "corrupted_batch", "corruption_generator"]

WHERE = ("support", "query", "both")  # which inputs of an episode a corruption reaches

SEVERITIES = (1, 2, 3, 4, 5)
Corruption = Callable[[Tensor, int, torch.Generator], Tensor]  # (images (N, C, H, W), severity, generator)


def _uniform(n: int, generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def _signs(n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1


def gaussian_noise(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Additive Gaussian noise, standard deviation 0.08-0.38."""
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return x + torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) * sigma


def impulse_noise(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Salt and pepper: a fraction 0.03-0.27 of the pixels set to 0 or 1."""
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    draw = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return torch.where(draw < amount / 2, torch.zeros_like(x), torch.where(draw > 1 - amount / 2, torch.ones_like(x), x))


def gaussian_blur(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Gaussian blur, standard deviation 0.4-1.6 pixels (for 28-pixel images; scaled with the size)."""
    return _blur(x, (0.4, 0.6, 0.8, 1.1, 1.6)[severity - 1] * x.shape[-1] / 28)


def contrast(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Contrast reduced towards each image's mean by a factor 0.4-0.05."""
    factor = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    return (x - mean) * factor + mean


def brightness(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Brightness raised by 0.1-0.5 (ImageNet-C's shift of the value channel)."""
    return x + (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]


def rotation(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Rotation by 15-75 degrees, clockwise or counter-clockwise (one draw per image)."""
    angle = math.radians((15, 30, 45, 60, 75)[severity - 1]) * _signs(len(x), generator)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    return _warp(x, torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1))


def shear(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Horizontal shear of 0.15-0.75, either direction."""
    amount = (0.15, 0.3, 0.45, 0.6, 0.75)[severity - 1] * _signs(len(x), generator)
    one, zero = torch.ones_like(amount), torch.zeros_like(amount)
    return _warp(x, torch.stack([torch.stack([one, amount, zero], 1), torch.stack([zero, one, zero], 1)], 1))


def translation(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Translation by 2-10 pixels of 28 (scaled with the size) in a random direction."""
    shift = (2, 4, 6, 8, 10)[severity - 1] / 28 * 2  # in grid units ([-1, 1] spans the image)
    direction = _uniform(len(x), generator, 0, 2 * math.pi)
    dx, dy = torch.cos(direction) * shift, torch.sin(direction) * shift
    one, zero = torch.ones_like(dx), torch.zeros_like(dx)
    return _warp(x, torch.stack([torch.stack([one, zero, dx], 1), torch.stack([zero, one, dy], 1)], 1))


def elastic(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Elastic distortion (Simard et al. 2003): a random displacement field smoothed by a Gaussian
    of 3 pixels, of strength 0.5-2.5 pixels (of 28, scaled with the size)."""
    n, (h, w) = len(x), x.shape[-2:]
    strength = (0.5, 1.0, 1.5, 2.0, 2.5)[severity - 1] / 28 * 2
    field = torch.rand(n, 2, h, w, generator=generator, dtype=x.dtype) * 2 - 1
    field = _blur(field, 3.0 * w / 28)
    field = field / field.flatten(1).abs().amax(1).clamp_min(1e-12).view(n, 1, 1, 1) * strength
    identity = F.affine_grid(torch.eye(2, 3, dtype=x.dtype).expand(n, 2, 3), [n, 1, h, w], align_corners=False)
    grid = identity + field.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid.to(x.device), padding_mode="border", align_corners=False)


def occlusion(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """A square of 0.2-0.6 of the side set to 0 (black), at a random place in each image."""
    (h, w), n = x.shape[-2:], len(x)
    side = max(1, round((0.2, 0.3, 0.4, 0.5, 0.6)[severity - 1] * min(h, w)))
    top = (torch.rand(n, generator=generator) * (h - side + 1)).long()
    left = (torch.rand(n, generator=generator) * (w - side + 1)).long()
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + side).view(n, 1, 1)) &
              (cols >= left.view(n, 1, 1)) & (cols < (left + side).view(n, 1, 1)))
    return x.masked_fill(inside.unsqueeze(1).to(x.device), 0.0)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise, "impulse_noise": impulse_noise, "gaussian_blur": gaussian_blur,
    "contrast": contrast, "brightness": brightness, "rotation": rotation, "shear": shear,
    "translation": translation, "elastic": elastic, "occlusion": occlusion,
}


def check_corruption(name: str, severity: int) -> None:
    """A ValueError naming the value unless `name` is a corruption and `severity` one of 1-5."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(sorted(CORRUPTIONS))}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of 1, 2, 3, 4, 5, got {severity!r}")


def corrupt(x: Tensor, name: str, severity: int, generator: torch.Generator) -> Tensor:
    """Images `(..., C, H, W)` in [0, 1] under corruption `name` at `severity` (1-5), clamped to [0, 1]."""
    check_corruption(name, severity)
    if x.dim() < 3:
        raise ValueError(f"corruptions take images (..., C, H, W), got shape {tuple(x.shape)}")
    images = x.reshape(-1, *x.shape[-3:])
    return CORRUPTIONS[name](images, severity, generator).clamp(0, 1).reshape(x.shape).to(x.dtype)


def corruption_generator(seed: int, index: int, part: str) -> torch.Generator:
    """The random stream of a corruption of episode `index`'s `part` ("support" or "query"), apart
    from the episode's own draws and from an attack's."""
    stream = {"support": 2, "query": 3}[part]
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, index, stream]).integers(2**62)))


def corrupted_batch(batch: TaskBatch, name: str, severity: int, where: str, *, seed: int, first_index: int) -> TaskBatch:
    """A `TaskBatch` whose support and/or query inputs (`where`: support, query or both) are
    corrupted; task `t` is episode `first_index + t` of a source with `seed` (the same corruption of
    an episode whatever the batch it comes in). Support and query shifted apart: support-query shift.

    Example:
        >>> import torch
        >>> batch = TaskBatch(torch.rand(2, 5, 1, 28, 28), torch.zeros(2, 5), torch.rand(2, 5, 1, 28, 28), torch.zeros(2, 5))
        >>> shifted = corrupted_batch(batch, "contrast", 5, "query", seed=0, first_index=0)
        >>> torch.equal(shifted.support_x, batch.support_x), torch.equal(shifted.query_x, batch.query_x)
        (True, False)
    """
    if where not in WHERE:
        raise ValueError(f"where must be one of {', '.join(WHERE)}, got {where!r}")

    def part(x: Tensor, which: str) -> Tensor:
        if where not in (which, "both"):
            return x
        return torch.stack([corrupt(x[t], name, severity, corruption_generator(seed, first_index + t, which))
                            for t in range(len(x))])

    return TaskBatch(part(batch.support_x, "support"), batch.support_y, part(batch.query_x, "query"), batch.query_y)


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of `(N, C, H, W)`, reflecting at the borders."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect" if radius < min(x.shape[-2:]) else "replicate")
    horizontal = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(horizontal, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    """Images resampled through affine maps `theta (N, 2, 3)` (output -> input, in grid units); the
    outside is black."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.device), padding_mode="zeros", align_corners=False)
