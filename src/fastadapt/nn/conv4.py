"""Conv4: 4 x [conv3x3, BatchNorm, ReLU, maxpool 2], the MAML / ProtoNet backbone, or its strided form."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

Pooling = Literal["max", "stride"]

__all__ = ["Conv4"]


class Conv4(nn.Module):
    """The 4-block convolutional backbone of MAML and Prototypical Networks.

    `features` maps `(B, C, H, W)` to flat embeddings; `head` (a Linear layer, absent when
    `ways=None`) maps them to `ways` logits. BatchNorm uses each batch's own statistics
    (`track_running_stats=False`): MAML's transductive convention, the same at train and test time.
    `track_running_stats=True` gives ordinary BatchNorm instead (batch statistics in train mode,
    running ones in eval mode), as pre-trained backbones use it (`algorithms.Baseline`).

    `pooling="stride"` halves the maps with stride-2 convolutions instead of max-pooling (no
    pooling layers), as the Reptile paper's Omniglot network: 28 -> 14 -> 7 -> 4 -> 2, a 256-d
    flattened embedding, ~3.7x fewer conv FLOPs. (The MAML paper's code and learn2learn's
    `OmniglotCNN` stride the same way but average the final 2 x 2 maps.)

    Example:
        >>> import torch
        >>> Conv4.omniglot(ways=5)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 5])
        >>> Conv4.omniglot(ways=None, pooling="stride").embedding_dim
        256
    """

    def __init__(self, in_channels: int = 1, ways: int | None = 5, hidden: int = 64, image_size: int = 28,
                 track_running_stats: bool = False, pooling: Pooling = "max") -> None:
        super().__init__()
        if pooling not in ("max", "stride"):
            raise ValueError(f"pooling must be 'max' or 'stride', got {pooling!r}")
        strided = pooling == "stride"
        blocks: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1, stride=2 if strided else 1),
                nn.BatchNorm2d(hidden, track_running_stats=track_running_stats),
                nn.ReLU(),
            ]
            if not strided:
                blocks.append(nn.MaxPool2d(2))
            channels, size = hidden, (size + 1) // 2 if strided else size // 2
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for 4 max-pools (needs >= 16)")
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.embedding_dim = hidden * size * size
        self.head = nn.Linear(self.embedding_dim, ways) if ways is not None else None

    @classmethod
    def omniglot(cls, ways: int | None = 5, track_running_stats: bool = False, pooling: Pooling = "max") -> "Conv4":
        """28x28 grey-scale input, 64 filters: a 64-d embedding (256-d with `pooling="stride"`)."""
        return cls(in_channels=1, ways=ways, hidden=64, image_size=28, track_running_stats=track_running_stats,
                   pooling=pooling)

    @classmethod
    def mini_imagenet(cls, ways: int | None = 5) -> "Conv4":
        """84x84 RGB input, 32 filters: an 800-d embedding."""
        return cls(in_channels=3, ways=ways, hidden=32, image_size=84)

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x)
        return self.head(z) if self.head is not None else z
