"""Omniglot (Lake et al. 2015) for few-shot learning, with the standard meta-train/meta-test protocol.

Data: the two image archives of the official release, read from
``<data root>/omniglot/images_background.zip`` and ``<data root>/omniglot/images_evaluation.zip``
(data root: the ``root`` argument, else ``$FASTADAPT_DATA``; see `fastadapt.data.paths`). Each holds
``<top>/<Alphabet>/<characterNN>/<id>_<drawer>.png``: 105x105 1-bit drawings, 20 per character,
964 characters in the background set and 659 in the evaluation set (1623 in all, 32460 images).
The archives are md5-checked (official and known re-packed checksums are accepted), decoded once
and cached as safetensors under the cache dir (never under the data root, which may be read-only).

Standard few-shot protocol (Vinyals et al. 2016; Finn et al. 2017), as `omniglot_splits` builds it:

* images are resized to 28x28 (Lanczos) and inverted, so strokes are bright (255) on black (0);
* both archives are pooled into 1623 characters and shuffled with a fixed seed: the first 1200
  characters are meta-training characters, the remaining 423 are meta-test characters
  (the background/evaluation division of the release is *not* used as the split);
* each meta-training character rotated by 0, 90, 180 and 270 degrees is its own class
  (1200 x 4 = 4800 training classes); meta-test characters are not rotated (423 classes);
* optionally, the last ``validation_characters`` of the 1200 training characters form a
  validation split (rotated like the training split).

Example:
    >>> splits = omniglot_splits("/data")  # doctest: +SKIP
    >>> splits["train"].num_classes, splits["test"].num_classes  # doctest: +SKIP
    (4800, 423)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import types
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fastadapt.data.datasets import ImageClassDataset
from fastadapt.data.download import fetch, md5_of
from fastadapt.data.paths import resolve_cache_dir, resolve_data_root
from fastadapt.io import save_tensors

__all__ = [
    "OMNIGLOT_ARCHIVES",
    "OMNIGLOT_BASE_URL",
    "OmniglotArchive",
    "OmniglotImages",
    "load_omniglot",
    "omniglot_splits",
]

logger = logging.getLogger(__name__)

OMNIGLOT_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"

_SOURCE_SIZE = 105  # side of the PNGs in the release
_CACHE_FORMAT = "omniglot-v1"  # bump when the decoded content changes
_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS
_CHARACTER_DIR = re.compile(r"character\d+")


@dataclass(frozen=True)
class OmniglotArchive:
    """One archive of the release: its file name, official URL and the md5s accepted for it."""

    name: str
    url: str
    md5s: tuple[str, ...]
    num_characters: int

    @property
    def top(self) -> str:
        """The top-level folder inside the zip (the name without ``.zip``)."""
        return self.name[: -len(".zip")]


OMNIGLOT_ARCHIVES: Mapping[str, OmniglotArchive] = types.MappingProxyType(
    {
        "images_background.zip": OmniglotArchive(
            name="images_background.zip",
            url=OMNIGLOT_BASE_URL + "images_background.zip",
            # official release, then the re-packed copy (same PNG bytes, different zip container)
            md5s=("68d2efa1b9178cc56df9314c21c6e718", "ccf8c8c810d7c776d496b2cba7c074bc"),
            num_characters=964,
        ),
        "images_evaluation.zip": OmniglotArchive(
            name="images_evaluation.zip",
            url=OMNIGLOT_BASE_URL + "images_evaluation.zip",
            md5s=("6b91aef0f799c5bb55b94e3f2daec811", "611e539b71de4e5240b122d0d9dc86e3"),
            num_characters=659,
        ),
    }
)
"""Archive name -> `OmniglotArchive` (official download URL and accepted md5s), background first."""


@dataclass(frozen=True, eq=False)
class OmniglotImages:
    """All Omniglot drawings, decoded.

    Attributes:
        images: uint8 ``(N, 1, S, S)``, strokes bright (255) on a black (0) background.
        character: int64 ``(N,)`` character id of each image, 0..C-1 (background archive first).
        characters: the C character names, e.g. ``"images_background/Latin/character01"``.
        num_background: how many of the characters come from the background archive (964).

    Example:
        >>> data = load_omniglot("/data")  # doctest: +SKIP
        >>> data.images.shape, len(data.characters)  # doctest: +SKIP
        (torch.Size([32460, 1, 28, 28]), 1623)
    """

    images: Tensor
    character: Tensor
    characters: list[str]
    num_background: int

    @property
    def num_characters(self) -> int:
        return len(self.characters)


# ----------------------------------------------------------------------------------------------
# files: checksums, download, missing/corrupt archives


def _get_data_hint(info: OmniglotArchive) -> str:
    return (
        f"Pass root= (or --data-root on the command line) or set FASTADAPT_DATA to the folder that "
        f"contains omniglot/{info.name}, or use download=True to fetch it from {info.url}"
    )


def _download(info: OmniglotArchive, dest: Path, base_url: str | None, verify: bool) -> None:
    """Fetches one archive (`data.download.fetch`); with `verify`, refuses a file of another md5."""
    url = (base_url or OMNIGLOT_BASE_URL).rstrip("/") + "/" + info.name

    def known_checksum(path: Path) -> None:
        got = md5_of(path)
        if verify and got not in info.md5s:
            raise ValueError(
                f"downloaded {url} has md5 {got}, expected one of {', '.join(info.md5s)}; "
                f"the file was discarded (not written to {dest}). Retry, or download it by hand from {info.url}"
            )

    fetch(url, dest, what="Omniglot archive", check=known_checksum)


def _archive_md5(info: OmniglotArchive, path: Path, *, download: bool, base_url: str | None, verify: bool) -> str:
    """The md5 of one archive, fetching it first if missing and `download`; checks it if `verify`."""
    if not path.is_file():
        if not download:
            raise FileNotFoundError(f"Omniglot archive not found: {path}. {_get_data_hint(info)}.")
        _download(info, path, base_url, verify)
    md5 = md5_of(path)
    if verify and md5 not in info.md5s:
        raise ValueError(
            f"Omniglot archive {path} has md5 {md5}, which is not a known checksum of {info.name} "
            f"(accepted: {', '.join(info.md5s)}). The file may be truncated or a different file: delete it and "
            f"re-download it (download=True, or from {info.url}), or pass verify=False for a custom archive."
        )
    return md5


# ----------------------------------------------------------------------------------------------
# decoding


def _bad_archive(path: Path, what: str) -> ValueError:
    info = OMNIGLOT_ARCHIVES.get(path.name)
    source = info.url if info is not None else "the official release"
    return ValueError(
        f"Omniglot archive {path} is corrupt or not in the expected layout: {what}. "
        f"Delete it and re-download it (download=True, or from {source})."
    )


def _list_characters(zf: zipfile.ZipFile, path: Path, top: str) -> dict[tuple[str, str], list[str]]:
    """Groups the PNG members by (alphabet, character) folder, checking the layout."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in zf.namelist():
        if name.endswith("/") or name.startswith("__MACOSX/") or Path(name).name.startswith("."):
            continue  # directory entries and macOS metadata
        parts = name.split("/")
        if (
            len(parts) != 4
            or parts[0] != top
            or not parts[1]
            or not _CHARACTER_DIR.fullmatch(parts[2])
            or not parts[3].lower().endswith(".png")
        ):
            raise _bad_archive(path, f"member {name!r} is not {top}/<Alphabet>/<characterNN>/<file>.png")
        groups.setdefault((parts[1], parts[2]), []).append(name)
    if not groups:
        raise _bad_archive(path, "it contains no character images")
    return groups


def _decode_archive(path: Path, top: str, image_size: int) -> tuple[np.ndarray, list[int], list[str]]:
    """Decodes one archive: images (n, S, S) uint8 inverted, images per character, character names."""
    try:
        with zipfile.ZipFile(path) as zf:
            groups = _list_characters(zf, path, top)
            keys = sorted(groups)
            total = sum(len(v) for v in groups.values())
            out = np.empty((total, image_size, image_size), dtype=np.uint8)
            counts: list[int] = []
            i = 0
            for key in keys:
                members = sorted(groups[key], key=lambda m: m.rsplit("/", 1)[1])
                counts.append(len(members))
                for member in members:
                    data = zf.read(member)
                    try:
                        with Image.open(io.BytesIO(data)) as img:
                            gray = img.convert("L")
                    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
                        raise _bad_archive(path, f"cannot decode {member!r} as an image ({e})") from e
                    if gray.size != (image_size, image_size):
                        gray = gray.resize((image_size, image_size), _LANCZOS)
                    out[i] = 255 - np.asarray(gray, dtype=np.uint8)
                    i += 1
                logger.debug("decoded %s/%s/%s", top, *key)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise _bad_archive(path, f"{type(e).__name__}: {e}") from e
    names = [f"{top}/{alphabet}/{character}" for alphabet, character in keys]
    return out, counts, names


def _decode_all(paths: list[tuple[OmniglotArchive, Path]], image_size: int) -> OmniglotImages:
    arrays: list[np.ndarray] = []
    counts: list[int] = []
    names: list[str] = []
    num_background = 0
    for info, path in paths:
        logger.info("decoding %s at %dx%d (once; the result is cached)", path, image_size, image_size)
        images, c, n = _decode_archive(path, info.top, image_size)
        arrays.append(images)
        counts += c
        names += n
        if info.name == "images_background.zip":
            num_background = len(n)
    images_t = torch.from_numpy(np.concatenate(arrays)).unsqueeze(1).contiguous()
    character = torch.repeat_interleave(torch.arange(len(names), dtype=torch.int64), torch.tensor(counts))
    return OmniglotImages(images_t, character, names, num_background)


# ----------------------------------------------------------------------------------------------
# cache


def _cache_path(cache_dir: str | os.PathLike[str] | None, md5s: list[str], image_size: int) -> Path:
    key = hashlib.sha256(":".join([_CACHE_FORMAT, *md5s]).encode()).hexdigest()[:24]
    return resolve_cache_dir(cache_dir) / "omniglot" / f"{key}-{image_size}.safetensors"


def _read_cache(path: Path, image_size: int) -> OmniglotImages:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        images = f.get_tensor("images")
        character = f.get_tensor("character")
    if meta.get("format") != _CACHE_FORMAT:
        raise ValueError(f"unknown cache format {meta.get('format')!r}")
    characters = json.loads(meta["characters"])
    num_background = int(meta["num_background"])
    n = images.shape[0]
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (1, image_size, image_size):
        raise ValueError(f"images are {images.dtype} {tuple(images.shape)}")
    if character.dtype != torch.int64 or tuple(character.shape) != (n,):
        raise ValueError(f"character ids are {character.dtype} {tuple(character.shape)}")
    if not isinstance(characters, list) or not all(isinstance(c, str) for c in characters):
        raise ValueError("character names are not a list of strings")
    if n == 0 or int(character.min()) < 0 or int(character.max()) >= len(characters):
        raise ValueError("character ids out of range")
    if not 0 <= num_background <= len(characters):
        raise ValueError(f"num_background {num_background} out of range")
    return OmniglotImages(images, character, characters, num_background)


def _write_cache(path: Path, data: OmniglotImages) -> None:
    meta = {
        "format": _CACHE_FORMAT,
        "characters": json.dumps(data.characters),
        "num_background": str(data.num_background),
    }
    try:
        save_tensors(path, {"images": data.images, "character": data.character}, metadata=meta)
    except OSError as e:
        warnings.warn(f"could not write the Omniglot cache {path} ({e}); it will be decoded again next time", stacklevel=3)


# ----------------------------------------------------------------------------------------------
# public API


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")


def load_omniglot(
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int = 28,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    verify: bool = True,
    base_url: str | None = None,
) -> OmniglotImages:
    """All 32460 Omniglot images at ``image_size`` x ``image_size``, strokes bright, with character ids.

    Reads ``<root>/omniglot/images_{background,evaluation}.zip`` (``root`` defaults to
    ``$FASTADAPT_DATA``), checks their md5 (unless ``verify=False``, for custom archives), and decodes
    them once into ``<cache_dir>/omniglot/`` (default ``$FASTADAPT_CACHE`` or ``~/.cache/fastadapt``).
    With ``download=True`` missing archives are fetched from ``base_url`` (default: the official
    GitHub release).

    Example:
        >>> data = load_omniglot("/data", image_size=28)  # doctest: +SKIP
        >>> data.images.shape, data.num_background  # doctest: +SKIP
        (torch.Size([32460, 1, 28, 28]), 964)
    """
    _check_image_size(image_size)
    folder = resolve_data_root(root) / "omniglot"
    paths = [(info, folder / info.name) for info in OMNIGLOT_ARCHIVES.values()]
    md5s = [_archive_md5(info, p, download=download, base_url=base_url, verify=verify) for info, p in paths]

    cache = _cache_path(cache_dir, md5s, image_size)
    if cache.is_file():
        try:
            return _read_cache(cache, image_size)
        except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
            warnings.warn(f"ignoring corrupt Omniglot cache {cache} ({type(e).__name__}: {e}); rebuilding it", stacklevel=2)
    data = _decode_all(paths, image_size)
    _write_cache(cache, data)
    return data


def _character_split(
    data: OmniglotImages,
    chars: Tensor,
    rotations: bool,
    transform: Callable[[Tensor], Tensor] | None,
) -> ImageClassDataset:
    """Images of `chars` (in that order); with `rotations`, 4 classes per character (0/90/180/270)."""
    rank = torch.full((data.num_characters,), -1, dtype=torch.int64)
    rank[chars] = torch.arange(chars.numel())
    r = rank[data.character]
    sel = (r >= 0).nonzero().squeeze(1)
    sel = sel[torch.argsort(r[sel], stable=True)]
    images, base = data.images[sel], r[sel]
    names = [data.characters[int(c)] for c in chars]
    if not rotations:
        return ImageClassDataset(images, base, names, transform)
    stacked = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    labels = torch.cat([base * 4 + k for k in range(4)])
    order = torch.argsort(labels, stable=True)
    class_names = [f"{n}/rot{90 * k}" for n in names for k in range(4)]
    return ImageClassDataset(stacked[order].contiguous(), labels[order], class_names, transform)


def omniglot_splits(
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int = 28,
    validation_characters: int = 0,
    split_seed: int = 0,
    rotations: bool = True,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    verify: bool = True,
    transform: Callable[[Tensor], Tensor] | None = None,
    train_characters: int = 1200,
) -> dict[str, ImageClassDataset]:
    """The standard few-shot Omniglot splits: ``{"train", "test"}`` (+ ``"validation"`` if asked).

    All characters are shuffled with ``torch.randperm`` seeded by ``split_seed``; the first
    ``train_characters`` (1200) are meta-training characters, the rest (423) meta-test. The last
    ``validation_characters`` of the training characters form the validation split. With
    ``rotations``, training and validation characters at 0/90/180/270 degrees are separate classes
    (4800 training classes); test characters are never rotated. Labels are 0..C-1 in each split, in
    permutation order (and rotation order within a character); class names look like
    ``"images_background/Latin/character01/rot90"`` (without ``/rotNN`` when not rotated).

    Example:
        >>> splits = omniglot_splits("/data", validation_characters=100)  # doctest: +SKIP
        >>> {k: v.num_classes for k, v in splits.items()}  # doctest: +SKIP
        {'train': 4400, 'validation': 400, 'test': 423}
    """
    _check_image_size(image_size)
    if isinstance(train_characters, bool) or not isinstance(train_characters, int) or train_characters < 1:
        raise ValueError(f"train_characters must be an int >= 1, got {train_characters!r}")
    if (
        isinstance(validation_characters, bool)
        or not isinstance(validation_characters, int)
        or not 0 <= validation_characters < train_characters
    ):
        raise ValueError(
            f"validation_characters must be an int with 0 <= validation_characters < {train_characters} "
            f"(the training characters), got {validation_characters!r}"
        )
    data = load_omniglot(
        root, image_size=image_size, download=download, cache_dir=cache_dir, verify=verify
    )
    n = data.num_characters
    if n <= train_characters:
        raise ValueError(
            f"Omniglot data has {n} characters, but the split needs more than train_characters={train_characters} "
            f"(at least one test character); the full data set has 1623. Pass a smaller train_characters= "
            f"for a reduced data set."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_train = train_characters - validation_characters
    splits = {"train": _character_split(data, perm[:n_train], rotations, transform)}
    if validation_characters > 0:
        splits["validation"] = _character_split(data, perm[n_train:train_characters], rotations, transform)
    splits["test"] = _character_split(data, perm[train_characters:], False, transform)
    return splits
