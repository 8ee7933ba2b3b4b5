"""ResNet-12, the few-shot standard backbone (TADAM, MetaOptNet, FEAT): four residual blocks of
64-160-320-640 channels, each three conv3x3-BatchNorm-LeakyReLU(0.1) layers with a 1x1-conv
shortcut and a 2x2 max-pool, then a global average pool; optional DropBlock (Ghiasi et al. 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DropBlock", "ResNet12"]


class DropBlock(nn.Module):
    """DropBlock: in training, zeroes `block_size` x `block_size` squares of each feature map so that
    a fraction `drop_rate` of the units is dropped, and rescales the rest; the identity in eval mode
    or with `drop_rate=0`. Randomness comes from torch's global generator.

    Example:
        >>> block = DropBlock(drop_rate=0.1, block_size=3).eval()
        >>> x = torch.ones(1, 2, 8, 8)
        >>> torch.equal(block(x), x)
        True
    """

    def __init__(self, drop_rate: float, block_size: int) -> None:
        super().__init__()
        if not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.drop_rate = drop_rate
        self.block_size = block_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_rate == 0:
            return x
        height, width = x.shape[-2:]
        size = min(self.block_size, height, width)
        valid = (height - size + 1) * (width - size + 1)
        gamma = self.drop_rate * height * width / (size * size * valid)
        seeds = torch.zeros_like(x)
        seeds[..., size // 2: height - (size - 1) // 2, size // 2: width - (size - 1) // 2] = gamma
        centres = torch.bernoulli(seeds)
        dropped = F.max_pool2d(centres, size, stride=1, padding=size // 2)[..., :height, :width]
        keep = 1 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp_min(1))


class _Block(nn.Module):
    """Three conv3x3-BN-LeakyReLU layers (the last without its activation), a 1x1-conv-BN shortcut,
    the sum's LeakyReLU, a 2x2 max-pool and DropBlock."""

    def __init__(self, in_channels: int, channels: int, track_running_stats: bool, drop_rate: float,
                 block_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, track_running_stats=track_running_stats)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, track_running_stats=track_running_stats)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, track_running_stats=track_running_stats)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False),
                                      nn.BatchNorm2d(channels, track_running_stats=track_running_stats))
        self.pool = nn.MaxPool2d(2)
        self.drop = DropBlock(drop_rate, block_size)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.1)
        h = self.bn3(self.conv3(h))
        return self.drop(self.pool(F.leaky_relu(h + self.shortcut(x), 0.1)))


class ResNet12(nn.Module):
    """ResNet-12 with a global average pool: a `channels[-1]`-d embedding (640), and a `ways`-way
    Linear `head` (absent when `ways=None`, for metric learners).

    BatchNorm as in `Conv4`: each batch's own statistics by default (`track_running_stats=False`,
    the transductive convention of MAML-style learners), ordinary BatchNorm with
    `track_running_stats=True`. `drop_rate` > 0 adds DropBlock after the last two blocks (block
    size `block_size`, 5 in the literature at 84x84), as MetaOptNet; training then draws from
    torch's global generator. Its residual connections make
    it a model the planner runs on the exact per-task path (`learner.plan(batch)` says so).

    Example:
        >>> ResNet12(in_channels=3, ways=5)(torch.zeros(2, 3, 84, 84)).shape
        torch.Size([2, 5])
        >>> ResNet12(ways=None, channels=(8, 16, 32, 64)).embedding_dim
        64
    """

    def __init__(self, in_channels: int = 3, ways: int | None = 5, channels: Sequence[int] = (64, 160, 320, 640),
                 track_running_stats: bool = False, drop_rate: float = 0.0, block_size: int = 5) -> None:
        super().__init__()
        if len(channels) != 4 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"channels must be 4 positive integers (one per block), got {channels!r}")
        blocks = []
        previous = in_channels
        for index, width in enumerate(channels):
            blocks.append(_Block(previous, width, track_running_stats, drop_rate if index >= 2 else 0.0, block_size))
            previous = width
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embedding_dim = channels[-1]
        self.head = nn.Linear(self.embedding_dim, ways) if ways is not None else None

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x)
        return self.head(z) if self.head is not None else z
