"""MNIST (LeCun, Cortes and Burges) from its original IDX files, for few-shot and cross-domain tasks.

Data: ``<data root>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each gzip-compressed
(``.gz``) or raw: the four files of the original release. Their content is md5-checked against the
published sums of the uncompressed files (gzip bytes differ between mirrors, the content does not).
Decoding is a header check and one `numpy.frombuffer`, so nothing is cached.

The ten digits are the classes. ``mnist_splits`` gives ``{"train", "test"}``: the 60,000 training
images and the 10,000 test images, all ten digits in both (new images, not new classes). Its use
here is cross-domain evaluation: a model meta-trained on Omniglot, tested on 5-way digit tasks.

Example:
    >>> splits = mnist_splits("/data")  # doctest: +SKIP
    >>> len(splits["train"]), len(splits["test"]), splits["test"].num_classes  # doctest: +SKIP
    (60000, 10000, 10)
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .datasets import ImageClassDataset
from .download import fetch
from .paths import resolve_data_root

__all__ = ["MNIST_BASE_URL", "MNIST_FILES", "load_mnist", "mnist_splits", "read_idx"]

MNIST_BASE_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"


@dataclass(frozen=True)
class MnistFile:
    """One file of the release: its name (without ``.gz``), the md5 of its uncompressed bytes, its shape."""

    name: str
    md5: str
    shape: tuple[int, ...]


MNIST_FILES: dict[str, tuple[MnistFile, MnistFile]] = {
    "train": (MnistFile("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb", (60000, 28, 28)),
              MnistFile("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624", (60000,))),
    "test": (MnistFile("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea", (10000, 28, 28)),
             MnistFile("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637", (10000,))),
}
"""Split -> (images file, labels file) of the original release."""

_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one MNIST uses


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped if it ends in ``.gz``; errors name the file."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"MNIST file {path} is not a complete gzip file ({e}): delete it and download it again") from e


def read_idx(path: str | os.PathLike[str], content: bytes | None = None) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip or raw) as a numpy array of its header's shape.

    Errors name the file and the problem: a magic number that is not IDX unsigned bytes, a header
    shorter than its dimensions, a body shorter or longer than the dimensions say.

    Example:
        >>> import tempfile; p = Path(tempfile.mkdtemp()) / "x-idx1-ubyte"
        >>> _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
        >>> read_idx(p).tolist()
        [7, 8, 9]
    """
    path = Path(path)
    data = _read_bytes(path) if content is None else content
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _UBYTE or data[3] == 0:
        raise ValueError(f"MNIST file {path}: bad IDX magic number {data[:4].hex() or '(empty)'}, expected "
                         f"0000 08 NN (unsigned bytes, NN dimensions): not an IDX file, or a damaged one")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"MNIST file {path}: truncated header ({len(data)} bytes, {header} needed for {ndim} dimensions)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise ValueError(f"MNIST file {path}: {len(data) - header} bytes of data, but its header "
                         f"{'x'.join(map(str, shape))} says {size}: the file is truncated or damaged")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _locate(folder: Path, file: MnistFile) -> Path | None:
    """``name.gz`` if present, else the raw ``name``, else None."""
    for candidate in (folder / f"{file.name}.gz", folder / file.name):
        if candidate.is_file():
            return candidate
    return None


def _checked_content(path: Path, file: MnistFile, verify: bool) -> bytes:
    content = _read_bytes(path)
    if verify:
        got = hashlib.md5(content, usedforsecurity=False).hexdigest()
        if got != file.md5:
            raise ValueError(f"MNIST file {path}: its content has md5 {got}, not the original {file.name}'s "
                             f"{file.md5}; delete it and download it again (download=True), or pass "
                             f"verify=False for a modified copy")
    return content


def _file(folder: Path, file: MnistFile, download: bool, base_url: str | None, verify: bool) -> np.ndarray:
    path = _locate(folder, file)
    if path is None:
        if not download:
            raise FileNotFoundError(
                f"MNIST file not found: {folder / file.name}.gz (or without .gz). Pass root= (or --data-root) or "
                f"set FASTADAPT_DATA to the folder that contains mnist/, or use download=True")
        path = folder / f"{file.name}.gz"
        url = (base_url or MNIST_BASE_URL).rstrip("/") + f"/{file.name}.gz"
        fetch(url, path, what="MNIST file", check=lambda tmp: _check_download(tmp, file, verify, url))
    array = read_idx(path, _checked_content(path, file, verify))
    if array.shape != file.shape and verify:
        raise ValueError(f"MNIST file {path}: shape {array.shape}, expected {file.shape}")
    return array


def _check_download(tmp: Path, file: MnistFile, verify: bool, url: str) -> None:
    """A downloaded ``.gz`` must be a gzip of the original content (with `verify`)."""
    try:
        with gzip.open(tmp, "rb") as f:
            content = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"downloaded {url} is not a complete gzip file ({e}); it was discarded") from e
    got = hashlib.md5(content, usedforsecurity=False).hexdigest()
    if verify and got != file.md5:
        raise ValueError(f"downloaded {url} has content md5 {got}, expected {file.md5}; it was discarded")


def load_mnist(root: str | os.PathLike[str] | None = None, *, split: str = "test", download: bool = False,
               verify: bool = True, base_url: str | None = None) -> ImageClassDataset:
    """One MNIST split (``"train"``: 60,000 images, ``"test"``: 10,000) as an `ImageClassDataset`:
    uint8 ``(N, 1, 28, 28)``, strokes bright on black (as Omniglot here), labels the digits 0-9.

    Reads ``<root>/mnist/`` (``root`` defaults to ``$FASTADAPT_DATA``); with ``download=True``,
    missing files are fetched from ``base_url`` (default: a mirror of the original files) and
    checked. ``verify=False`` accepts files of other content (a subset, a modified copy).

    Example:
        >>> test = load_mnist("/data", split="test")  # doctest: +SKIP
        >>> test.images.shape, test.labels[:3].tolist()  # doctest: +SKIP
        (torch.Size([10000, 1, 28, 28]), [7, 2, 1])
    """
    if split not in MNIST_FILES:
        raise ValueError(f"MNIST split must be one of {sorted(MNIST_FILES)}, got {split!r}")
    folder = resolve_data_root(root) / "mnist"
    images_file, labels_file = MNIST_FILES[split]
    images = _file(folder, images_file, download, base_url, verify)
    labels = _file(folder, labels_file, download, base_url, verify)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"MNIST files in {folder}: images must be 3-dimensional (N, H, W) and labels 1-dimensional, "
                         f"got {images.shape} and {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST files in {folder}: {images.shape[0]} images in {images_file.name} but "
                         f"{labels.shape[0]} labels in {labels_file.name}")
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"MNIST file {folder / labels_file.name}: label {int(labels.max())} is not a digit 0-9")
    return ImageClassDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                             [str(d) for d in range(10)])


def mnist_splits(root: str | os.PathLike[str] | None = None, *, download: bool = False, verify: bool = True,
                 base_url: str | None = None) -> dict[str, ImageClassDataset]:
    """``{"train", "test"}``: MNIST's training and test images, all ten digits in each.

    Example:
        >>> sorted(mnist_splits("/data"))  # doctest: +SKIP
        ['test', 'train']
    """
    return {split: load_mnist(root, split=split, download=download, verify=verify, base_url=base_url)
            for split in MNIST_FILES}
