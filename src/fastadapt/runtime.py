"""Process-wide settings that make meta-training faster on CPU.

glibc hands large freed blocks back to the operating system and maps fresh pages for the next
allocation of that size; a meta-learning step allocates and frees the same tens of megabytes of
activations thousands of times, and every fresh page costs a fault. Keeping freed memory in the
heap removed most of that cost (measured: a 75-image Conv4 first-layer convolution 21 ms -> 4 ms
on one thread; docs/performance.md has the end-to-end numbers).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["keep_freed_memory", "torch_threads", "map_in_threads"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    The same as starting Python with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1`; the process
    keeps its peak heap size until it exits. Returns False (and changes nothing) where the C
    library is not glibc. The `fastadapt` command calls it at start-up.

    Example:
        >>> keep_freed_memory() in (True, False)
        True
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in (
        (_M_MMAP_MAX, 0), (_M_MMAP_THRESHOLD, _INT_MAX), (_M_TRIM_THRESHOLD, _INT_MAX)))


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Within the block torch uses `count` intra-op threads (None: unchanged); restored after.

    Example:
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def map_in_threads(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """`[fn(item) for item in items]`, run by `workers` Python threads at once, each with one
    intra-op torch thread (restored after); the caller's context variables are seen by every call.

    On a 2-core CPU two small independent computations (say, meta-gradients of two task groups)
    this way beat one after the other with two intra-op threads, whose parallel regions are too
    short to keep both cores busy (docs/performance.md). Results come back in `items`' order.

    Example:
        >>> map_in_threads(lambda x: x * 2, [1, 2, 3], workers=2)
        [2, 4, 6]
    """
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]

    def call(item: T, context: contextvars.Context) -> R:
        torch.set_num_threads(1)  # (OpenMP's thread count is per calling thread)
        return context.run(fn, item)

    with torch_threads(1), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(call, items, [contextvars.copy_context() for _ in items]))
