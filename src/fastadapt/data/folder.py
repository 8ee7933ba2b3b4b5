"""Image folders: one sub-folder per class, any image format Pillow reads, grey or RGB.

`load_image_folder(path)` decodes every image once, resized to `image_size` x `image_size`
(Lanczos) with `channels` channels, into an `ImageClassDataset`; the result is cached as
safetensors under the cache dir, keyed by every file's path, size and modification time and by
the decode settings, so an edited folder is decoded again. `folder_splits(path)` splits the classes:

- by the folder's own split: sub-folders `train/`, `val/` (or `validation/`) and `test/`, each
  with one sub-folder per class (the layout of many few-shot releases);
- by split files `train.txt`, `val.txt`, `test.txt` beside the class folders, one class name per
  line;
- else by a seed: a shuffled fifth of the classes (at least one) is the test split, `validation`
  classes of the rest the validation split, the others meta-training.

Every class needs as many images as an episode draws (checked by the episode sampler, which names
the class). Hidden files (starting with '.') are skipped; any other file that Pillow cannot read
is an error naming it.

Example:
    >>> splits = folder_splits("/data/my-images", image_size=84)  # doctest: +SKIP
    >>> splits["train"].images.shape[1:]  # doctest: +SKIP
    torch.Size([3, 84, 84])
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..io import load_tensors, save_tensors
from .datasets import ImageClassDataset
from .paths import resolve_cache_dir

__all__ = ["decode_images", "folder_splits", "load_image_folder", "cached_images"]

logger = logging.getLogger(__name__)

_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS
_CACHE_FORMAT = "image-folder-v1"  # bump when the decoded content changes
_SPLIT_DIRS = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}
_SPLIT_FILES = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}


def _visible(entries: Sequence[Path]) -> list[Path]:
    return sorted(p for p in entries if not p.name.startswith("."))


def _open(path: Path, load: bool) -> Image.Image:
    """The image at `path` (header only unless `load`); an error naming the file if Pillow cannot read it."""
    try:
        img = Image.open(path)
        if load:
            img.load()
        return img
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path} is not an image Pillow can read ({type(e).__name__}: {e}); remove it from the "
                         f"class folder") from e


def _channels_of(mode: str) -> int:
    return 1 if mode in ("1", "L", "I", "I;16", "F", "LA") else 3


def decode_images(files: Sequence[Path], image_size: int | None, channels: int | None) -> np.ndarray:
    """Decodes `files` into uint8 `(N, channels, S, S)`, resized (Lanczos) to `image_size`.

    `channels=None`: 1 if every image is grey, 3 if every image is colour; a folder that mixes both
    is refused with one file of each, since the choice changes the data (say channels 1 or 3).
    `image_size=None`: the images' own size, which must then be square and the same for all.
    Headers are read first (one image in memory at a time), then the images one by one.

    Example:
        >>> decode_images([], 8, 1).shape
        (0, 1, 8, 8)
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
    kinds: dict[int, Path] = {}
    sizes: dict[tuple[int, int], Path] = {}
    for f in files:
        with _open(f, load=False) as img:
            kinds.setdefault(_channels_of(img.mode), f)
            sizes.setdefault(img.size, f)
    if channels is None:
        if len(kinds) > 1:
            raise ValueError(f"the folder mixes grey and colour images ({kinds[1]} is grey, {kinds[3]} is colour): "
                             f"say which to use, channels: 1 (grey) or channels: 3 (RGB)")
        channels = next(iter(kinds), 1)
    if image_size is None:
        (width, height), first = next(iter(sizes.items()), ((1, 1), None))
        if len(sizes) > 1 or width != height:
            other = list(sizes.values())[-1]
            raise ValueError(f"images differ in size or are not square ({first}: {width}x{height}; {other}): "
                             f"give image_size (e.g. 84) to resize them all")
        image_size = width
    out = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
    for i, f in enumerate(files):
        with _open(f, load=True) as img:
            converted = img.convert("L" if channels == 1 else "RGB")
        if converted.size != (image_size, image_size):
            converted = converted.resize((image_size, image_size), _LANCZOS)
        array = np.asarray(converted, dtype=np.uint8)
        out[i] = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return out


def cached_images(files: Sequence[Path], labels: Sequence[int], class_names: Sequence[str], *, image_size: int | None,
                  channels: int | None, cache_dir: str | os.PathLike[str] | None = None) -> ImageClassDataset:
    """`decode_images(files)` with `labels`, decoded once and cached under `<cache dir>/images/`.

    The cache key covers every file's path, size and modification time and the decode settings.
    """
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key_source = json.dumps([_CACHE_FORMAT, image_size, channels, stats, list(labels), list(class_names)])
    key = hashlib.sha256(key_source.encode()).hexdigest()[:24]
    cache = resolve_cache_dir(cache_dir) / "images" / f"{key}.safetensors"
    if cache.is_file():
        try:
            tensors = load_tensors(cache)
            return ImageClassDataset(tensors["images"], tensors["labels"], class_names)
        except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
            warnings.warn(f"ignoring unreadable image cache {cache} ({type(e).__name__}: {e}); decoding again",
                          stacklevel=2)
    logger.info("decoding %d images (once; the result is cached in %s)", len(files), cache)
    images = torch.from_numpy(decode_images(files, image_size, channels))
    dataset = ImageClassDataset(images, torch.tensor(list(labels), dtype=torch.int64), class_names)
    try:
        save_tensors(cache, {"images": dataset.images, "labels": dataset.labels})
    except OSError as e:
        warnings.warn(f"could not write the image cache {cache} ({e}); the images will be decoded again next time",
                      stacklevel=2)
    return dataset


def _class_folders(root: Path, names: Sequence[str] | None = None) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (expected one sub-folder per class)")
    folders = [p for p in _visible(list(root.iterdir())) if p.is_dir()]
    if names is not None:
        by_name = {p.name: p for p in folders}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"class {missing[0]!r} is listed in a split file but {root / missing[0]} is not a folder")
        folders = [by_name[n] for n in names]
    if not folders:
        raise ValueError(f"image folder {root} has no class sub-folders (expected one sub-folder of images per class)")
    return folders


def load_image_folder(path: str | os.PathLike[str], *, image_size: int | None = None, channels: int | None = None,
                      classes: Sequence[str] | None = None,
                      cache_dir: str | os.PathLike[str] | None = None) -> ImageClassDataset:
    """Every image under `path/<class>/`, labels 0..C-1 in sorted class order (or the order of
    `classes`, a subset of the class folders).

    Example:
        >>> load_image_folder("/data/my-images/train", image_size=28, channels=1).num_classes  # doctest: +SKIP
        64
    """
    folders = _class_folders(Path(path), classes)
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        images = [p for p in _visible(list(folder.iterdir())) if p.is_file()]
        if not images:
            raise ValueError(f"class folder {folder} has no images")
        files += images
        labels += [label] * len(images)
    return cached_images(files, labels, [f.name for f in folders], image_size=image_size, channels=channels,
                         cache_dir=cache_dir)


def _read_split_file(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"split file {path} is not UTF-8 text ({e})") from e
    if not names:
        raise ValueError(f"split file {path} lists no classes")
    return names


def folder_splits(path: str | os.PathLike[str], *, image_size: int | None = None, channels: int | None = None,
                  validation: int = 0, split_seed: int = 0,
                  cache_dir: str | os.PathLike[str] | None = None) -> dict[str, ImageClassDataset]:
    """`{"train", "test"}` (and `"validation"`) of an image folder: by its split sub-folders, by
    its split files, or by `split_seed` (see the module's description).

    Example:
        >>> sorted(folder_splits("/data/my-images", image_size=28, validation=5))  # doctest: +SKIP
        ['test', 'train', 'validation']
    """
    root = Path(path)
    options = {"image_size": image_size, "channels": channels, "cache_dir": cache_dir}
    split_dirs = {split: next((root / d for d in dirs if (root / d).is_dir()), None) for split, dirs in _SPLIT_DIRS.items()}
    if split_dirs["train"] is not None and split_dirs["test"] is not None:
        return {split: load_image_folder(d, **options) for split, d in split_dirs.items() if d is not None}
    if (root / _SPLIT_FILES["train"]).is_file() and (root / _SPLIT_FILES["test"]).is_file():
        return {split: load_image_folder(root, classes=_read_split_file(root / name), **options)
                for split, name in _SPLIT_FILES.items() if (root / name).is_file()}
    names = [p.name for p in _class_folders(root)]
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(split_seed)).tolist()
    shuffled = [names[i] for i in order]
    n_test = max(1, len(names) // 5)
    if not 0 <= validation < len(names) - n_test:
        raise ValueError(f"validation={validation} classes leaves no training class: {root} has {len(names)} classes, "
                         f"{n_test} of them for testing")
    n_train = len(names) - n_test - validation
    parts = {"train": shuffled[:n_train], "validation": shuffled[n_train:n_train + validation],
             "test": shuffled[n_train + validation:]}
    return {split: load_image_folder(root, classes=sorted(chosen), **options) for split, chosen in parts.items() if chosen}
