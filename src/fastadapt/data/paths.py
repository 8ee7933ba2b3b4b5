"""Where data is read from (the data root) and where decoded caches are written (never the data root)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["resolve_data_root", "resolve_cache_dir"]


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: `root` if given, else `$FASTADAPT_DATA`, else `~/.local/share/fastadapt/data`.

    Example:
        >>> resolve_data_root("/data").as_posix()
        '/data'
    """
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("FASTADAPT_DATA"):
        return Path(os.environ["FASTADAPT_DATA"]).expanduser()
    return Path.home() / ".local" / "share" / "fastadapt" / "data"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The decode cache: `cache_dir`, else `$FASTADAPT_CACHE`, else `$XDG_CACHE_HOME/fastadapt` (~/.cache)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("FASTADAPT_CACHE"):
        return Path(os.environ["FASTADAPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "fastadapt"
