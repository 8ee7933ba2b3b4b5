"""Labelled image datasets held as one uint8 tensor, so episodes are gathered in a single indexing op."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["ImageClassDataset"]


class ImageClassDataset:
    """Images `(N, C, H, W)` as uint8 with int64 labels; items come out as floats in [0, 1].

    `transform`, if given, is any callable taking and returning one float image tensor `(C, H, W)`
    (torchvision transforms work where torchvision is installed).

    Example:
        >>> ds = ImageClassDataset(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]))
        >>> x, y = ds[2]; x.shape, y
        (torch.Size([1, 28, 28]), 1)
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        class_names: Sequence[str] | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.class_names = list(class_names) if class_names is not None else None
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return int(self.labels.unique().numel())

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.gather(torch.tensor([index]))[0], int(self.labels[index])

    def gather(self, indices: Tensor) -> Tensor:
        """Float images for many indices at once, with the transform applied to each."""
        x = self.images[indices].float().div_(255.0)
        if self.transform is not None:
            x = torch.stack([self.transform(img) for img in x])
        return x
