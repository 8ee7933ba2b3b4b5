"""Multi-layer perceptron (the 1-40-40-1 sinusoid regressor of the MAML paper)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Linear layers with ReLU between them; the last layer is `head`.

    Example:
        >>> import torch
        >>> MLP(1, [40, 40], 1)(torch.zeros(3, 1)).shape
        torch.Size([3, 1])
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
