"""Fetching a data file: into a temporary file beside its destination, checked, then renamed.

A failed or refused download never leaves a partial file where the loader looks for data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

__all__ = ["fetch", "md5_of"]

logger = logging.getLogger(__name__)


def md5_of(path: str | os.PathLike[str]) -> str:
    """The md5 hex digest of a file's bytes, read in 1 MiB blocks.

    Example:
        >>> import tempfile; p = Path(tempfile.mkdtemp()) / "f"; _ = p.write_bytes(b"")
        >>> md5_of(p)
        'd41d8cd98f00b204e9800998ecf8427e'
    """
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path, *, what: str, check: Callable[[Path], None] | None = None) -> None:
    """Downloads `url` to `dest` atomically: `check(temporary_file)` may refuse it (by raising
    ValueError, which names the problem); only an accepted file is renamed onto `dest`.

    `what` names the file in errors ("Omniglot archive", "MNIST file"). A network or disk error is
    an OSError naming the URL and where to place the file by hand.

    Example:
        >>> fetch("http://127.0.0.1:9/none.zip", Path("/tmp/none.zip"), what="test file")  # doctest: +SKIP
        Traceback (most recent call last):
        OSError: could not download test file http://127.0.0.1:9/none.zip: ...
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    logger.info("downloading %s to %s", url, dest)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
        except (urllib.error.URLError, OSError) as e:
            raise OSError(f"could not download {what} {url}: {e}. Download it by hand and place it at {dest}") from e
        if check is not None:
            check(tmp)
        os.replace(tmp, dest)
        logger.info("downloaded %s (%d bytes)", dest, dest.stat().st_size)
    finally:
        tmp.unlink(missing_ok=True)
