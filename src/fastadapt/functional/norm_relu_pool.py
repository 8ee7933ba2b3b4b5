"""BatchNorm (batch statistics) -> ReLU -> max-pool 2, pooled before the ReLU and keeping less.

PyTorch's three layers keep, for the backward, BatchNorm's input, the ReLU's full-resolution
output (which max-pool keeps too) and 64-bit pooling indices, and their backward makes a
full-resolution ReLU gradient on top of the unpooled one. ReLU is monotonic, so it commutes with
the max-pool: here BatchNorm's output is pooled first, by a pool that keeps only its indices, and
the ReLU runs on the pooled quarter (its output is the next layer's input, kept anyway). No
full-resolution activation besides BatchNorm's input is kept. The result and the gradients are
those of the three layers, bit for bit in the same precision (a window whose maximum is not
positive gets no gradient either way), and the backward is differentiable (second order).

Second-order MAML, Conv4 Omniglot 5w1s, groups of 2 (docs/performance.md): a group's support
phase keeps 20.0 MB instead of 24.2 at 5 inner steps, and a step's peak of live tensors falls
from 57 to 49 MB, at the same speed. The max-pool itself runs on PyTorch's channels-last kernel,
several times faster on the CPU than its NCHW one. `unpool` (with 16-bit indices) also serves the
first block's backward (`functional.fused_block`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["norm_relu_pool", "is_norm_relu_pool", "narrow_indices", "unpool"]


def norm_relu_pool(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """`max_pool2d(relu(batch_norm(x, training=True)), 2)`, computed as `relu(max_pool2d(batch_norm(x), 2))`.

    Example:
        >>> x, g, b = torch.randn(4, 3, 6, 6), torch.rand(3), torch.randn(3)
        >>> ref = F.max_pool2d(F.relu(F.batch_norm(x, None, None, g, b, True)), 2)
        >>> torch.equal(norm_relu_pool(x, g, b), ref)
        True
    """
    normed = F.batch_norm(x, None, None, gamma, beta, True, 0.0, eps)
    if _under_vmap():  # memory layouts cannot be queried there; PyTorch's layers have batching rules
        return F.max_pool2d(F.relu(normed), 2)
    return F.relu(_MaxPool.apply(normed)[0])


def is_norm_relu_pool(layers: list[nn.Module]) -> bool:
    """True for [BatchNorm2d (affine, batch statistics), ReLU, MaxPool2d(2)], what `norm_relu_pool` computes.

    Example:
        >>> is_norm_relu_pool([nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)])
        True
    """
    if len(layers) != 3:
        return False
    norm, act, pool = layers
    return (isinstance(norm, nn.BatchNorm2d) and norm.affine and not norm.track_running_stats
            and type(act) is nn.ReLU
            and isinstance(pool, nn.MaxPool2d) and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
            and pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
            and not pool.return_indices)


# Pooling indices widened to 64 bits at a time in `unpool` (0.5 MB).
_INDEX_CHUNK = 1 << 16


def narrow_indices(indices: Tensor, plane: int) -> Tensor:
    """max-pool indices (positions within an image plane of `plane` pixels) in 16 bits where they
    fit (planes up to 181 x 181: a quarter of int64's bytes), else 32.

    Example:
        >>> narrow_indices(torch.tensor([3, 5]), 28 * 28).dtype
        torch.int16
    """
    return indices.to(torch.int16 if plane <= torch.iinfo(torch.int16).max else torch.int32)


def unpool(grad: Tensor, indices: Tensor, size: tuple[int, int], channels_last: bool) -> Tensor:
    """max_pool2d(2)'s backward: `grad (B, C, h/2, w/2)` placed at the pooling `indices` (narrow
    ints) of a zero `(B, C, *size)` map, laid out channels last or not. Its own backward gathers
    at the indices, so a second-order graph keeps the narrow indices, not a 64-bit copy.

    Example:
        >>> indices = torch.tensor([[[[3]]]], dtype=torch.int16)
        >>> unpool(torch.ones(1, 1, 1, 1), indices, (2, 2), False).flatten().tolist()
        [0.0, 0.0, 0.0, 1.0]
    """
    return _Unpool.apply(grad, indices, size, channels_last)


class _MaxPool(torch.autograd.Function):
    """`max_pool2d(x, 2)` that keeps only its indices, narrowed, for the backward (PyTorch's keeps
    `x` and 64-bit indices). The backward, `unpool`, is differentiable, so second order works."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        # PyTorch's channels-last max-pool kernel is 4-5x faster on the CPU than its NCHW one, copy
        # included; the results go back to the input's layout (the backward then matches it too).
        pooled, indices = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), [2, 2], [2, 2], [0, 0], [1, 1], False)
        indices = narrow_indices(indices, x.shape[-2] * x.shape[-1])
        if x.is_contiguous():
            return pooled.contiguous(), indices.contiguous()
        return pooled, indices

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        ctx.size = tuple(inputs[0].shape[-2:])
        ctx.channels_last = not inputs[0].is_contiguous()
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, grad: Tensor, _: Tensor) -> Tensor:  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        return unpool(grad, indices, ctx.size, ctx.channels_last)


class _Unpool(torch.autograd.Function):
    """`unpool`; its backward is a gather at the narrow indices (differentiable again)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: Tensor, indices: Tensor, size: tuple[int, int],  # type: ignore[override]
                channels_last: bool) -> Tensor:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        full = torch.empty(*grad.shape[:2], *size, dtype=grad.dtype, device=grad.device, memory_format=layout)
        if _under_vmap():  # no out= arguments there: in one piece
            return torch.ops.aten.max_pool2d_with_indices_backward(grad, full, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                                   indices.long())
        # A few images at a time, so the 64-bit copy of the indices the kernel needs stays small.
        step = max(1, _INDEX_CHUNK // indices[0].numel())
        for start in range(0, grad.shape[0], step):
            part = full[start:start + step]  # the kernel reads only the shape of its `self` argument
            torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
                grad[start:start + step], part, [2, 2], [2, 2], [0, 0], [1, 1], False,
                indices[start:start + step].long(), grad_input=part)
        return full

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        positions = indices.long().flatten(2)                                          # (B, C, h/2 * w/2)
        return grad.flatten(2).gather(2, positions).view(indices.shape), None, None, None


def _under_vmap() -> bool:
    """Whether a `torch.func.vmap` is running (its batched tensors cannot be asked for memory layouts)."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    return any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)
