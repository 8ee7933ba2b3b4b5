"""mini-ImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017).

Layout under ``<data root>/mini-imagenet/``: ``images/`` holding the 60,000 images, and
``train.csv``, ``val.csv``, ``test.csv``, each with the header ``filename,label`` and one row per
image (``n0153282900000005.jpg,n01532829``): 64 training, 16 validation and 20 test classes of 600
images. Images are decoded once at ``image_size`` (84, the standard) in RGB and cached
(`data.folder.cached_images`). The data is not downloaded: its licence is ImageNet's.

Example:
    >>> splits = mini_imagenet_splits("/data")  # doctest: +SKIP
    >>> {k: v.num_classes for k, v in splits.items()}  # doctest: +SKIP
    {'train': 64, 'validation': 16, 'test': 20}
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .datasets import ImageClassDataset
from .folder import cached_images
from .paths import resolve_data_root

__all__ = ["mini_imagenet_splits"]

_CSV = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}


def _read_csv(path: Path, images: Path) -> tuple[list[Path], list[int], list[str]]:
    """Files, labels 0..C-1 (classes in order of first appearance) and class names of one split file."""
    if not path.is_file():
        raise FileNotFoundError(f"mini-ImageNet split file not found: {path} (expected train.csv, val.csv and test.csv "
                                f"of Ravi & Larochelle beside images/)")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise ValueError(f"mini-ImageNet split file {path} is not UTF-8 text ({e})") from e
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise ValueError(f"mini-ImageNet split file {path} must start with the header 'filename,label', "
                         f"got {','.join(rows[0]) if rows else '(an empty file)'!r}")
    files: list[Path] = []
    labels: list[int] = []
    classes: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0] or not row[1]:
            raise ValueError(f"mini-ImageNet split file {path}, line {line}: expected 'filename,label', got {row!r}")
        file = images / row[0]
        if not file.is_file():
            raise FileNotFoundError(f"mini-ImageNet image {file} (listed in {path}, line {line}) is missing")
        files.append(file)
        labels.append(classes.setdefault(row[1], len(classes)))
    if not files:
        raise ValueError(f"mini-ImageNet split file {path} lists no images")
    return files, labels, list(classes)


def mini_imagenet_splits(root: str | os.PathLike[str] | None = None, *, image_size: int = 84,
                         cache_dir: str | os.PathLike[str] | None = None) -> dict[str, ImageClassDataset]:
    """``{"train", "validation", "test"}`` of mini-ImageNet: 64 / 16 / 20 classes, RGB at `image_size`.

    Example:
        >>> mini_imagenet_splits("/data")["test"].images.shape  # doctest: +SKIP
        torch.Size([12000, 3, 84, 84])
    """
    folder = resolve_data_root(root) / "mini-imagenet"
    splits = {}
    for split, name in _CSV.items():
        files, labels, classes = _read_csv(folder / name, folder / "images")
        splits[split] = cached_images(files, labels, classes, image_size=image_size, channels=3, cache_dir=cache_dir)
    return splits
