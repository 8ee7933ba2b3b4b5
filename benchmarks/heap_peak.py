"""Peak of the heap bytes in use during one second-order MAML step, and the operation at the peak.

RSS (what benchmarks/peers.py compares) also counts what glibc keeps after a free, which moves
with allocation order; the bytes glibc has handed out and not got back (`mallinfo2`: in-use
chunks plus mmapped ones) are what the step really holds. They are sampled after every aten
operation (a dispatch mode), so a temporary that lives inside one kernel is not seen. Conv4,
Omniglot-shaped 5w1s, 15 queries, meta-batch 32, random images, one thread by default;
deterministic.
To compare two versions, put the other one first on PYTHONPATH.

    cd benchmarks && python heap_peak.py --steps 1 5 --group 2
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import random_batch
from fastadapt import MAML
from fastadapt.nn import Conv4


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    """Bytes glibc has allocated and not had back: in-use heap chunks plus mmapped chunks."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakTracker(TorchDispatchMode):
    """Records the highest `heap_in_use()` after any operation, and the library lines that called it."""

    def __init__(self) -> None:
        super().__init__()
        self.peak, self.where = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        now = heap_in_use()
        if now > self.peak:
            frames = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                      if "fastadapt" in f.filename]
            self.peak, self.where = now, f"{func} < " + " < ".join(reversed(frames[-3:]))
        return out


def step_peak(steps: int, group: int) -> tuple[float, str]:
    """MB above the heap in use before the step, after two warm-up steps (one under the tracker)."""
    torch.manual_seed(0)
    model = Conv4.omniglot(5)
    batch = random_batch(32, 5, 1, 15)
    learner = MAML(model, 0.4, steps, task_group=group)
    learner.meta_loss(batch)[0].backward()
    with PeakTracker():
        learner.meta_loss(batch)[0].backward()
    model.zero_grad(set_to_none=True)
    gc.collect()
    _LIBC.malloc_trim(0)
    before = heap_in_use()
    tracker = PeakTracker()
    with tracker:
        learner.meta_loss(batch)[0].backward()
    return (tracker.peak - before) / 2**20, tracker.where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--group", type=int, default=2, help="task_group (tasks per support-phase graph)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| inner steps | peak heap in use above the step's start | at |\n| --- | --- | --- |")
    for steps in args.steps:
        mb, where = step_peak(steps, args.group)
        print(f"| {steps} | {mb:.1f} MB | `{where}` |")


if __name__ == "__main__":
    main()
