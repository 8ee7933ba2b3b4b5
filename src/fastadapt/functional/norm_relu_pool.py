"""BatchNorm (batch statistics) -> ReLU -> max-pool 2, pooled before the ReLU and keeping less.

PyTorch's three layers keep, for the backward, BatchNorm's input, the ReLU's full-resolution
output (which max-pool keeps too) and 64-bit pooling indices, and their backward makes a
full-resolution ReLU gradient on top of the unpooled one. ReLU is monotonic, so it commutes with
the max-pool: here BatchNorm's output is pooled first, by a pool that keeps only its indices, and
the ReLU runs on the pooled quarter (its output is the next layer's input, kept anyway). No
full-resolution activation besides BatchNorm's input is kept. The output, and the gradients of a
`create_graph` backward, are those of the three layers bit for bit in the same precision (a window
whose maximum is not positive gets no gradient either way), and that backward is differentiable
(second order). A first-order backward skips the full-resolution gradient of BatchNorm's output
(nonzero only at the pooling winners): its reductions run over the winners, so its gradients
equal PyTorch's to rounding (1e-12 relative in float64, tests/test_fast_paths.py).

Second-order MAML, Conv4 Omniglot 5w1s, groups of 2 (docs/performance.md): a group's support
phase keeps 20.0 MB instead of 24.2 at 5 inner steps, and a step's peak of live tensors falls
from 57 to 49 MB, at the same speed. With the first-order backward above and the first block's
backward remaking its patches, the peak of heap in use falls from 47.9 to 45.1 MB (5 steps) and
from 31.5 to 28.8 MB (1 step; benchmarks/heap_peak.py). The max-pool itself runs on PyTorch's channels-last kernel,
several times faster on the CPU than its NCHW one. `unpool` (with 16-bit indices) also serves the
first block's backward (`functional.fused_block`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["norm_relu_pool", "is_norm_relu_pool", "narrow_indices", "unpool", "under_vmap"]


def norm_relu_pool(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """`max_pool2d(relu(batch_norm(x, training=True)), 2)`, computed as `relu(max_pool2d(batch_norm(x), 2))`.

    Example:
        >>> x, g, b = torch.randn(4, 3, 6, 6), torch.rand(3), torch.randn(3)
        >>> ref = F.max_pool2d(F.relu(F.batch_norm(x, None, None, g, b, True)), 2)
        >>> torch.equal(norm_relu_pool(x, g, b), ref)
        True
    """
    if under_vmap():  # memory layouts cannot be queried there; PyTorch's layers have batching rules
        return F.max_pool2d(F.relu(F.batch_norm(x, None, None, gamma, beta, True, 0.0, eps)), 2)
    return F.relu(_NormPool.apply(x, gamma, beta, eps)[0])


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


# Pooling indices widened to 64 bits at a time (128 KB).
_INDEX_CHUNK = 1 << 14


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


class _NormPool(torch.autograd.Function):
    """BatchNorm (batch statistics) then `max_pool2d(2)`, keeping BatchNorm's input, its batch
    statistics and the narrowed pooling indices (PyTorch's layers also keep the normalised map's
    ReLU and 64-bit indices).

    A first-order backward (no `create_graph`: every query pass, and the meta-gradient's pass back
    through the support phase) never makes the full-resolution gradient of the normalised map: only
    the pooling winners get one, so BatchNorm's reductions run over the pooled quarter and its input
    gradient is one pass over the input plus a scatter at the winners. A `create_graph` backward
    (the inner loop of second-order MAML) unpools and runs PyTorch's BatchNorm backward, which
    autograd differentiates again, as with PyTorch's layers.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, ...]:  # type: ignore[override]
        normed, mean, invstd = torch.ops.aten.native_batch_norm(x, gamma, beta, None, None, True, 0.0, eps)
        # PyTorch's channels-last max-pool kernel is 4-5x faster on the CPU than its NCHW one, copy
        # included; the results go back to the input's layout (the backward then matches it too).
        pooled, indices = torch.ops.aten.max_pool2d_with_indices(
            normed.contiguous(memory_format=torch.channels_last), [2, 2], [2, 2], [0, 0], [1, 1], False)
        indices = narrow_indices(indices, x.shape[-2] * x.shape[-1])
        if x.is_contiguous():
            pooled, indices = pooled.contiguous(), indices.contiguous()
        return pooled, indices, mean, invstd

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple[Tensor, ...]) -> None:
        x, gamma, _, ctx.eps = inputs
        _, indices, mean, invstd = output
        ctx.channels_last = not x.is_contiguous()
        ctx.mark_non_differentiable(indices, mean, invstd)
        ctx.save_for_backward(x, gamma, indices, mean, invstd)

    @staticmethod
    def backward(ctx, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, gamma, indices, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a differentiable backward
            full = unpool(grad, indices, tuple(x.shape[-2:]), ctx.channels_last)
            grads = torch.ops.aten.native_batch_norm_backward(full, x, gamma, None, None, mean, invstd, True, ctx.eps,
                                                              list(ctx.needs_input_grad[:3]))
            return (*grads, None)
        return (*_norm_pool_backward(grad, x, gamma, indices, mean, invstd, ctx.needs_input_grad[0]), None)


def _norm_pool_backward(grad: Tensor, x: Tensor, gamma: Tensor, indices: Tensor, mean: Tensor, invstd: Tensor,
                        input_grad: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """BatchNorm's backward for an output gradient that is `grad (B, C, h, w)` at the pooling winners
    `indices` and zero elsewhere: the gradients w.r.t. `x`, `gamma` and `beta`.

    With x̂ = (x - mean) * invstd and n = B*H*W per channel: dβ = Σ g, dγ = Σ g x̂ (both over the
    winners), dx = γ invstd (g_full - dβ / n - x̂ dγ / n).
    """
    channels = x.shape[1]
    stats = torch.promote_types(x.dtype, torch.float32)
    g = grad.flatten(2).to(stats)                                                    # (B, C, h*w)
    # one pooled-size buffer: x at the winners, then x̂ there, then g x̂, then the winners' dx share
    buffer = torch.empty(g.shape, dtype=x.dtype, device=x.device)
    for i, step in _image_steps(indices):
        torch.gather(x[i:i + step].flatten(2), 2, indices[i:i + step].flatten(2).long(), out=buffer[i:i + step])
    centred = buffer.to(stats).sub_(mean[:, None]).mul_(invstd[:, None])
    grad_beta = g.sum((0, 2))
    grad_gamma = centred.mul_(g).sum((0, 2))
    if not input_grad:
        return None, grad_gamma.to(gamma.dtype), grad_beta.to(gamma.dtype)
    n = x.numel() // channels
    scale = gamma.to(stats) * invstd
    slope = -scale * invstd * grad_gamma / n                                         # dx = slope * x + offset + ...
    offset = scale * (mean * invstd * grad_gamma - grad_beta) / n
    # NCHW or channels last, so that flatten(2) below is a view whatever the strides of x
    layout = torch.contiguous_format if x.is_contiguous() or not x.is_contiguous(
        memory_format=torch.channels_last) else torch.channels_last
    grad_x = torch.empty_like(x, memory_format=layout)
    torch.addcmul(offset.view(channels, 1, 1).to(x.dtype), x, slope.view(channels, 1, 1).to(x.dtype), out=grad_x)
    torch.mul(g, scale[:, None], out=buffer)                                         # ... + scale * g_full
    flat = grad_x.flatten(2)
    for i, step in _image_steps(indices):
        flat[i:i + step].scatter_add_(2, indices[i:i + step].flatten(2).long(), buffer[i:i + step])
    return grad_x, grad_gamma.to(gamma.dtype), grad_beta.to(gamma.dtype)


def _image_steps(indices: Tensor) -> list[tuple[int, int]]:
    """(start, count) over the leading (image) dimension, `_INDEX_CHUNK` indices widened at a time."""
    step = max(1, _INDEX_CHUNK // max(1, indices[0].numel()))
    return [(start, step) for start in range(0, indices.shape[0], step)]


class _Unpool(torch.autograd.Function):
    """`unpool`; its backward is a gather at the narrow indices (differentiable again)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: Tensor, indices: Tensor, size: tuple[int, int],  # type: ignore[override]
                channels_last: bool) -> Tensor:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        full = torch.empty(*grad.shape[:2], *size, dtype=grad.dtype, device=grad.device, memory_format=layout)
        if under_vmap():  # no out= arguments there: in one piece
            return torch.ops.aten.max_pool2d_with_indices_backward(grad, full, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                                   indices.long())
        # A few images at a time, so the 64-bit copy of the indices the kernel needs stays small.
        for start, step in _image_steps(indices):
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


def under_vmap() -> bool:
    """Whether a `torch.func.vmap` is running (its batched tensors cannot be asked for memory layouts)."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    return any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)
