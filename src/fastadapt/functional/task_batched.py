"""The support-set inner loop of all tasks at once: T weight sets in one grouped-convolution graph.

A support set is small (5 images on Omniglot 5w1s), so a per-task inner loop is bound by the cost
of launching hundreds of tiny operations, not by arithmetic (measured: the support phase ran no
faster on 2 threads than on 1). Here the T tasks' weights are stacked on a leading dimension and
the network runs once: convolutions as one grouped convolution (T groups), BatchNorm over T*C
channels (each task's own batch statistics, exactly), Linear as a batched matmul. The graph is
ordinary autograd, so second-order terms are exact; `torch.func.vmap` is not used (its batching
rules are wrong through BatchNorm in second order, see tests/test_meta_gradients.py).

Supported: any model whose forward is proven to be a chain of Conv2d, BatchNorm2d without running
statistics, ReLU, MaxPool2d, Flatten and Linear layers (`functional.structure`), whatever its
class: a `fastadapt.nn.Conv4` or a user's `nn.Sequential` of the same layers.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from ..data.episodes import TaskBatch
from .fused_block import fused_forward, reorders_on, tasks_conv_bn_pool
from .inner_loop import LossFn, Params, forward
from .norm_relu_pool import is_norm_relu_pool, norm_relu_pool
from .structure import Chain, layer_chain

__all__ = ["BatchedForward", "task_batched_forward", "looped_forward", "per_task_losses", "stacked_params",
           "check_task_workers", "thread_safe_forward", "task_workers_for"]

BatchedForward = Callable[[Params, Tensor], Tensor]
# model -> (the chain the forward was built for, the forward)
_BUILT: "weakref.WeakKeyDictionary[nn.Module, tuple[Chain, BatchedForward]]" = weakref.WeakKeyDictionary()


def task_batched_forward(model: nn.Module) -> BatchedForward | None:
    """`run(params, x)`: params of shape `(T, *p.shape)`, `x` of shape `(T, N, C, H, W)` -> `(T, N, out)`.

    For any model whose forward is proven to be a chain of Conv2d, BatchNorm2d (batch statistics),
    ReLU, MaxPool2d, Flatten and (after the Flatten) Linear layers, whatever its class
    (`functional.structure.layer_chain`); None for others. Read again at every call, so a model
    edited since the last call gets its own function.

    Example:
        >>> from fastadapt.nn import Conv4
        >>> model = Conv4.omniglot(ways=5)
        >>> stacked = {n: p.expand(2, *p.shape) for n, p in model.named_parameters()}
        >>> x = torch.rand(2, 3, 1, 28, 28)
        >>> torch.allclose(task_batched_forward(model)(stacked, x)[1], model(x[1]), atol=1e-5)
        True
    """
    chain = layer_chain(model)
    if chain is None or not _batchable(chain):
        return None
    built = _BUILT.get(model)
    if built is None or built[0] is not chain:
        built = _BUILT[model] = (chain, _build_batched(chain, reorder=fused_forward(model) is not None))
    return built[1]


def _build_batched(chain: Chain, reorder: bool) -> BatchedForward:
    """The task-batched forward of `chain`, its first block reordered (on the CPU) with `reorder`."""
    layers = [(f"{name}.", m) for name, m in chain]
    eps = layers[1][1].eps if reorder else 0.0

    def run(params: Params, x: Tensor) -> Tensor:
        tasks, n = x.shape[:2]
        reordered = reorder and reorders_on(x)
        if reordered:
            h = tasks_conv_bn_pool(x, params[layers[0][0] + "weight"], params[layers[1][0] + "weight"],
                                   params[layers[1][0] + "bias"], eps)                # (T, N, C, H, W)
        else:
            h = x
        h = h.transpose(0, 1).reshape(n, tasks * h.shape[2], *h.shape[3:])          # (N, T*C, H, W)
        if reordered:  # the block's ReLU after the copy: it and the next conv save the same tensor
            h = F.relu(h)
        rest = layers[4 if reordered else 0:]
        on_cpu = reorders_on(x)
        flat = False
        i = 0
        while i < len(rest):
            prefix, m = rest[i]
            i += 1
            if on_cpu and is_norm_relu_pool([module for _, module in rest[i - 1:i + 2]]):
                h = norm_relu_pool(h, params[prefix + "weight"].reshape(-1), params[prefix + "bias"].reshape(-1), m.eps)
                i += 2
            elif isinstance(m, nn.Conv2d):
                w = params[prefix + "weight"]
                bias = params[prefix + "bias"].reshape(-1) if m.bias is not None else None
                h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), bias, m.stride, m.padding, m.dilation, groups=tasks)
            elif isinstance(m, nn.BatchNorm2d):
                h = F.batch_norm(h, None, None, params[prefix + "weight"].reshape(-1),
                                 params[prefix + "bias"].reshape(-1), True, 0.0, m.eps)
            elif isinstance(m, nn.ReLU):
                h = F.relu(h)
            elif isinstance(m, nn.MaxPool2d):
                h = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
            elif isinstance(m, nn.Flatten):
                h, flat = h.reshape(n, tasks, -1).transpose(0, 1), True                 # (T, N, D)
            elif m.bias is not None:  # nn.Linear on (T, N, D)
                h = torch.baddbmm(params[prefix + "bias"][:, None, :], h, params[prefix + "weight"].transpose(1, 2))
            else:
                h = torch.bmm(h, params[prefix + "weight"].transpose(1, 2))
        return h if flat else h.reshape(n, tasks, -1, *h.shape[2:]).transpose(0, 1)   # (T, N, C, H, W)

    return run


def thread_safe_forward(model: nn.Module) -> bool:
    """Whether `model`'s functional forward may run in several threads at once (now: its structure
    may change; learners check it at every call and run one worker otherwise).

    Example:
        >>> thread_safe_forward(nn.Linear(2, 1))
        False
    """
    return fused_forward(model) is not None


def task_workers_for(task_workers: int, model: nn.Module, batch: TaskBatch) -> int:
    """The workers a batch runs with: `task_workers` on the CPU for a model whose forward is (still)
    thread-safe, else 1 (the same numbers, one group at a time).

    Example:
        >>> task_workers_for(2, nn.Linear(2, 1), TaskBatch(*(torch.zeros(1, 1, 2) for _ in range(4))))
        1
    """
    on_cpu = batch.support_x.device.type == "cpu"
    return task_workers if task_workers > 1 and on_cpu and thread_safe_forward(model) else 1


def check_task_workers(task_workers: int) -> int:
    """`task_workers` (tasks or task groups at once in threads, `runtime.map_in_threads`), validated:
    an integer >= 1. Where the forward is not thread-safe the batches still run one at a time
    (`task_workers_for`).

    Example:
        >>> check_task_workers(2)
        2
    """
    if isinstance(task_workers, bool) or not isinstance(task_workers, int) or task_workers < 1:
        raise ValueError(f"task_workers must be an integer >= 1, got {task_workers!r}")
    return task_workers


def looped_forward(model: nn.Module) -> BatchedForward:
    """A `BatchedForward` for any module: `run(params (T, ...), x (T, N, ...))`, one call of the
    model's own forward per task (the exact reference for every model).

    Example:
        >>> model = nn.Linear(2, 1)
        >>> stacked = {n: p.detach().expand(3, *p.shape) for n, p in model.named_parameters()}
        >>> looped_forward(model)(stacked, torch.zeros(3, 4, 2)).shape
        torch.Size([3, 4, 1])
    """
    return lambda params, x: torch.stack([forward(model, {n: p[t] for n, p in params.items()}, x[t])
                                          for t in range(x.shape[0])])


def stacked_params(params: Params, tasks: int) -> Params:
    """Every tensor repeated for `tasks` tasks on a new leading dimension (views, no copies).

    Example:
        >>> stacked_params({"w": torch.zeros(3)}, 2)["w"].shape
        torch.Size([2, 3])
    """
    return {name: p.expand(tasks, *p.shape) for name, p in params.items()}


def _batchable(chain: Chain) -> bool:
    """Whether `_build_batched` computes `chain`: convolutions without groups and with explicit
    padding, one `Flatten(1, -1)` at most, Linear layers only after it."""
    flat = False
    for _, m in chain:
        if isinstance(m, nn.Conv2d) and not (m.groups == 1 and isinstance(m.padding, tuple)):
            return False
        if isinstance(m, nn.Flatten):
            if flat or (m.start_dim, m.end_dim) != (1, -1):
                return False
            flat = True
        if isinstance(m, nn.Linear) and not flat:
            return False
    return True


def per_task_losses(loss_fn: LossFn, vmapped: bool = True) -> Callable[[Tensor, Tensor], Tensor]:
    """`loss_fn` over stacked tasks: outputs `(T, N, ...)`, targets `(T, N, ...)` -> losses `(T,)`,
    on outputs in at least float32 (under CPU autocast the vmapped loss would otherwise stay in
    bf16, unlike the per-task path's). `vmapped=False` calls `loss_fn` task by task (a loss of
    yours need not be vmap-safe).

    Example:
        >>> per_task_losses(torch.nn.functional.mse_loss)(torch.ones(3, 4, 1), torch.zeros(3, 4, 1))
        tensor([1., 1., 1.])
    """
    def one(output: Tensor, target: Tensor) -> Tensor:
        return loss_fn(output.to(torch.promote_types(output.dtype, torch.float32)), target)

    if vmapped:
        return vmap(one)
    return lambda outputs, targets: torch.stack([one(o, t) for o, t in zip(outputs, targets)])
