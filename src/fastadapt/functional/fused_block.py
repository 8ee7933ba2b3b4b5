"""The first conv block, conv3x3 -> BatchNorm (batch statistics) -> ReLU -> max-pool 2, reordered.

Why: in a Conv4 pass on Omniglot the first block took ~70% of the time (profiled: BatchNorm,
ReLU, max-pool and their backwards over 64 x 28 x 28 maps per image, all memory-bound) while
holding ~5% of the FLOPs. Its input has few channels, so the conv output's statistics come from
the K = C_in * 9 dimensional input patches, and the full-resolution maps need not go through
BatchNorm and ReLU at all:

- BatchNorm's per-channel affine map a*y + b and ReLU are monotonic, so max-pool commutes with
  the shift b and ReLU: pool the scaled conv output a*y (the scale folded into the conv weights)
  and add the shift and apply ReLU on the pooled quarter only.
- Mean and variance of the conv output come from the patch mean m and covariance S (K x K):
  E[y] = w.m (+ bias, which BatchNorm removes), Var[y] = w' S w.

The conv output is computed a few images at a time and max-pooled at once (the full-resolution
output, 15 MB per Omniglot query set, never exists whole); only the input images, the patch mean
and 16-bit pooling indices are kept for the backward, which remakes the patches a few images at a
time. The backward is made of differentiable torch ops, so autograd
differentiates the block to any order (second-order MAML's inner loop included). Exact in exact
arithmetic (the float64 tests compare it with PyTorch's layers to 1e-12); in floating point a
max-pool tie PyTorch breaks one way may break the other, as between any two correct
implementations.
"""

from __future__ import annotations

import contextlib
import weakref
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .norm_relu_pool import is_norm_relu_pool, narrow_indices, norm_relu_pool, unpool
from .structure import Chain, layer_chain

__all__ = ["conv_bn_relu_pool", "tasks_conv_bn_pool", "fused_forward", "chain_layer", "unfused", "is_fusable", "reorders_on"]

# Up to this patch size (C_in * kh * kw) the reordering beats PyTorch's layers (RGB 3x3 is 27).
_MAX_PATCH = 32


def conv_bn_relu_pool(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """`max_pool2d(relu(batch_norm(conv2d(x, weight, padding=k//2), training=True)), 2)`, reordered.

    The conv bias is left out: BatchNorm with batch statistics removes it exactly (its gradient
    is zero). Runs in float32 (or float64) also under bf16 autocast: the work is memory-bound
    and the statistics need the precision. `tasks_conv_bn_pool` is the same for T weight sets,
    before the ReLU.

    Example:
        >>> x, w = torch.rand(4, 1, 8, 8), torch.randn(3, 1, 3, 3)
        >>> g, b = torch.ones(3), torch.zeros(3)
        >>> ref = F.max_pool2d(F.relu(F.batch_norm(F.conv2d(x, w, padding=1), None, None, g, b, True)), 2)
        >>> torch.allclose(conv_bn_relu_pool(x, w, g, b), ref, atol=1e-5)
        True
    """
    return F.relu(tasks_conv_bn_pool(x[None], weight[None], gamma[None], beta[None], eps)[0])


def tasks_conv_bn_pool(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """`conv_bn_relu_pool` of T tasks at once, before its ReLU (which commutes with the max-pool):
    `x (T, N, C_in, H, W)`, `weight (T, C, C_in, k, k)`, `gamma, beta (T, C)` ->
    `(T, N, C, H // 2, W // 2)`, each task with its own batch statistics. A caller that copies the
    result into another layout applies the ReLU there, so autograd saves one copy, not two.

    Example:
        >>> x, w, g, b = torch.rand(2, 4, 1, 8, 8), torch.randn(2, 3, 1, 3, 3), torch.ones(2, 3), torch.zeros(2, 3)
        >>> second = F.relu(tasks_conv_bn_pool(x, w, g, b))[1]
        >>> torch.allclose(second, conv_bn_relu_pool(x[1], w[1], g[1], b[1]), atol=1e-5)
        True
    """
    with torch.autocast(x.device.type, enabled=False):
        dtype = torch.promote_types(weight.dtype, torch.float32)
        x, weight, gamma, beta = (t.to(dtype) for t in (x, weight, gamma, beta))
        tasks, n, _, h, w = x.shape
        channels = weight.shape[1]
        kernel = tuple(weight.shape[-2:])
        patches = _patch_rows(x, kernel)                                              # (T, N*H*W, K)
        mean_patch = patches.mean(1, keepdim=True)                                    # (T, 1, K)
        centred = patches - mean_patch
        covariance = centred.transpose(1, 2) @ centred / patches.shape[1]             # (T, K, K)
        del patches
        w2 = weight.reshape(tasks, channels, -1)                                      # (T, C, K)
        rstd = (((w2 @ covariance) * w2).sum(2) + eps).rsqrt()                      # (T, C): 1 / sigma of the conv output
        scale = gamma * rstd                                                          # BatchNorm's per-channel scale
        # The pool picks each window's winner of the scaled, centred conv output (its max, whatever
        # the scale's sign); BatchNorm's shift and the ReLU come after, on the pooled quarter. The
        # scale lives in the right factor, so no product is kept for its gradient. (A contiguous
        # K x C right factor: its gradient is then patches' @ grad, 5-20x faster here than the
        # transposed product autograd picks for a transposed view.)
        right = (w2 * scale[..., None]).transpose(1, 2).contiguous()                 # (T, K, C)
        out = _pooled_product(centred, x, mean_patch, right, kernel) + beta[:, None]  # (T, N*H/2*W/2, C)
        return out.view(tasks, n, h // 2, w // 2, channels).permute(0, 1, 4, 2, 3)


# model -> (the chain the forward was built for, the forward)
_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[Chain, Callable]]" = weakref.WeakKeyDictionary()
_UNFUSED: ContextVar[bool] = ContextVar("fastadapt_unfused", default=False)


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Within the block every model runs layer by layer (`fused_forward` gives None), for code
    that intercepts `F.batch_norm`, as per-step BatchNorm statistics do. Only this thread and
    context are affected; other learners on the same model keep the reordered block.

    Example:
        >>> from fastadapt.nn import Conv4
        >>> model = Conv4.omniglot(ways=5)
        >>> with unfused():
        ...     print(fused_forward(model))
        None
    """
    token = _UNFUSED.set(True)
    try:
        yield
    finally:
        _UNFUSED.reset(token)


def fused_forward(model: nn.Module) -> Callable[[dict[str, Tensor], Tensor], Tensor] | None:
    """A forward for `model` with its first conv block reordered on the CPU (layer by layer on other
    devices), or None if it has no such block (or inside `unfused()`).

    Recognised by structure (`functional.structure.layer_chain`): any model whose forward is
    proven to be a chain of known layers starting with Conv2d (odd square kernel, stride 1, same
    zero padding, no groups or dilation, C_in * k * k <= 32) -> BatchNorm2d (affine, batch
    statistics) -> ReLU -> MaxPool2d(2): a `fastadapt.nn.Conv4`, or a user's `nn.Sequential` of
    the same layers. Later BatchNorm -> ReLU -> MaxPool2d(2) blocks run as
    `functional.norm_relu_pool`; every layer runs as a function of its weights (never swapping the
    module's own parameters, so two threads may run it at once).

    Example:
        >>> from fastadapt.nn import Conv4
        >>> model = Conv4.omniglot(ways=5)
        >>> run = fused_forward(model)
        >>> x = torch.rand(3, 1, 28, 28)
        >>> torch.allclose(run(dict(model.named_parameters()), x), model(x), atol=1e-5)
        True
    """
    if not torch.compiler.is_compiling() and _UNFUSED.get():  # (Dynamo cannot trace ContextVar.get)
        return None
    chain = layer_chain(model)
    if chain is None or not is_fusable([m for _, m in chain[:4]]):
        return None
    built = _CACHE.get(model)
    if built is None or built[0] is not chain:
        built = _CACHE[model] = (chain, _build(model, chain))
    return built[1]


def reorders_on(x: Tensor) -> bool:
    """Whether the reordered block pays for input `x`: on the CPU only (on a GPU cuDNN's layers ran
    1.5-2.5x faster, benchmarks/gpu_throughput.py).

    Example:
        >>> reorders_on(torch.zeros(1))
        True
    """
    return x.device.type == "cpu"


def _build(model: nn.Module, chain: Chain) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    (conv, _), (norm_name, norm), *_ = chain
    rest = list(chain[4:])

    def run(params: dict[str, Tensor], x: Tensor) -> Tensor:
        if not reorders_on(x):
            return functional_call(model, params, (x,), strict=False)

        def get(name: str) -> Tensor:
            return params[name] if name in params else model.get_parameter(name)

        h = conv_bn_relu_pool(x, get(f"{conv}.weight"), get(f"{norm_name}.weight"), get(f"{norm_name}.bias"), norm.eps)
        i = 0
        while i < len(rest):
            name, module = rest[i]
            if is_norm_relu_pool([m for _, m in rest[i:i + 3]]):
                h = norm_relu_pool(h, get(f"{name}.weight"), get(f"{name}.bias"), module.eps)
                i += 3
                continue
            h = chain_layer(module, name, get, h)
            i += 1
        return h

    return run


def chain_layer(module: nn.Module, name: str, get: Callable[[str], Tensor], h: Tensor) -> Tensor:
    """One layer of a `structure.layer_chain` (called `name`) on `h`, with its weights from `get`:
    the function the module's own `forward` computes, as a function of those weights (not through
    `functional_call`, which swaps the module's own parameters and so cannot serve two threads).

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> torch.equal(chain_layer(lin, "l", lambda n: getattr(lin, n[2:]), torch.ones(3, 2)), lin(torch.ones(3, 2)))
        True
    """
    if isinstance(module, nn.Conv2d):
        bias = get(f"{name}.bias") if module.bias is not None else None
        return F.conv2d(h, get(f"{name}.weight"), bias, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.Linear):
        return F.linear(h, get(f"{name}.weight"), get(f"{name}.bias") if module.bias is not None else None)
    if isinstance(module, nn.BatchNorm2d):  # batch statistics (`structure.batch_norm_with_batch_statistics`)
        return F.batch_norm(h, None, None, get(f"{name}.weight"), get(f"{name}.bias"), True, 0.0, module.eps)
    if isinstance(module, nn.MaxPool2d):
        return F.max_pool2d(h, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    if isinstance(module, nn.Flatten):
        return h.flatten(module.start_dim, module.end_dim)
    return F.relu(h)


def _patch_columns(x: Tensor, kernel: tuple[int, int]) -> Tensor:
    """Conv input patches of `x (T, N, C_in, H, W)` as `F.unfold` columns `(T*N, K, H*W)` (same padding)."""
    return F.unfold(x.flatten(0, 1), kernel, padding=(kernel[0] // 2, kernel[1] // 2))


def _patch_rows(x: Tensor, kernel: tuple[int, int]) -> Tensor:
    """Conv input patches of `x (T, N, C_in, H, W)` as rows `(T, N*H*W, K)`, image by image."""
    tasks, n, _, h, w = x.shape
    return _patch_columns(x, kernel).view(tasks, n, -1, h * w).transpose(2, 3).reshape(tasks, n * h * w, -1)


# Images whose conv output is computed at a time: about 1 MB of it per task, so the full-resolution
# product never exists whole (15 MB for an Omniglot query set) and each chunk stays in cache.
_CHUNK_ELEMENTS = 1 << 18


def _pooled_product(centred: Tensor, x: Tensor, mean_patch: Tensor, right: Tensor, kernel: tuple[int, int]) -> Tensor:
    """`max_pool2d(centred @ right, 2)` over the image-ordered rows `centred (T, N*H*W, K)` of the
    patches of `x (T, N, C_in, H, W)` less `mean_patch (T, 1, K)`, with `right (T, K, C)` ->
    `(T, N*(H//2)*(W//2), C)`. Keeps `x` and the pooling indices for the backward, not the product,
    nor the patches (the backward remakes them a few images at a time)."""
    h, w = x.shape[-2:]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, mean_patch, right)):
        return _PooledProduct.apply(centred.detach(), x, mean_patch, right, kernel)[0]
    return torch.cat([_pool_chunk(centred[:, _rows(images, h * w)] @ right, h, w, False)[0]
                      for images in _image_chunks(x, right)], 1)


def _rows(images: slice, per_image: int) -> slice:
    return slice(images.start * per_image, images.stop * per_image)


def _centred_columns(x: Tensor, mean_patch: Tensor, kernel: tuple[int, int]) -> Tensor:
    """The centred conv input patches of the images `x (T, n, C_in, H, W)` as columns `(T*n, K, H*W)`
    (`F.unfold`'s layout: no transposed copy)."""
    tasks, n, _, h, w = x.shape
    columns = _patch_columns(x, kernel)
    columns.view(tasks, n, -1, h * w).sub_(mean_patch.view(tasks, 1, -1, 1))
    return columns


def _pool_chunk(product: Tensor, h: int, w: int, indices: bool) -> tuple[Tensor, Tensor | None]:
    """max_pool2d of one chunk `(T, n*h*w, C)` -> rows `(T, n*(h//2)*(w//2), C)`, and its indices."""
    tasks, channels = product.shape[0], product.shape[-1]
    images = product.view(-1, h, w, channels).permute(0, 3, 1, 2)                 # channels last
    if not indices:
        return F.max_pool2d(images, 2).permute(0, 2, 3, 1).reshape(tasks, -1, channels), None
    pooled, where = F.max_pool2d(images, 2, return_indices=True)
    return pooled.permute(0, 2, 3, 1).reshape(tasks, -1, channels), narrow_indices(where, h * w)


class _PooledProduct(torch.autograd.Function):
    """`_pooled_product` whose backward remakes each chunk's patches and its full-resolution
    gradient (from the pooling indices). Made of differentiable ops, so second-order MAML
    differentiates through it (and through the input, for attacks on it); `setup_context` makes it
    usable under `torch.func` transforms (the inner loop's `grad`). The forward reads the detached
    rows `centred`; gradients flow to what they are made of, `x` and `mean_patch`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(centred: Tensor, x: Tensor, mean_patch: Tensor, right: Tensor,  # type: ignore[override]
                kernel: tuple[int, int]) -> tuple[Tensor, Tensor]:
        h, w = x.shape[-2:]
        chunks = [_pool_chunk(centred[:, _rows(images, h * w)] @ right, h, w, True) for images in _image_chunks(x, right)]
        return torch.cat([v for v, _ in chunks], 1), torch.cat([i for _, i in chunks], 0)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        _, x, mean_patch, right, ctx.kernel = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, mean_patch, right, output[1])

    @staticmethod
    def backward(ctx, grad: Tensor, _: Tensor) -> tuple[None, Tensor | None, Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, mean_patch, right, indices = ctx.saved_tensors
        kernel = ctx.kernel
        tasks, _, _, h, w = x.shape
        channels = right.shape[-1]
        grad_x, grad_mean, grad_right = [], None, None
        pooled_rows, done = (h // 2) * (w // 2), 0
        for images in _image_chunks(x, right):
            count = images.stop - images.start
            g = grad[:, images.start * pooled_rows: images.stop * pooled_rows]
            g = g.reshape(tasks * count, h // 2, w // 2, channels).permute(0, 3, 1, 2)
            full = unpool(g, indices[done: done + tasks * count], (h, w), channels_last=True)
            done += tasks * count
            full = full.permute(0, 2, 3, 1).reshape(tasks, -1, channels)           # (T, n*h*w, C)
            if ctx.needs_input_grad[3]:
                part = _centred_columns(x[:, images], mean_patch, kernel) @ full.view(tasks * count, h * w, channels)
                part = part.view(tasks, count, *part.shape[1:]).sum(1)                 # (T, K, C)
                grad_right = part if grad_right is None else grad_right + part
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                grad_rows = full @ right.transpose(1, 2)                               # (T, n*h*w, K)
                part = -grad_rows.sum(1, keepdim=True)
                grad_mean = part if grad_mean is None else grad_mean + part
                grad_x.append(_fold_rows(grad_rows, x.shape[2], (h, w), kernel, count))
        return (None, torch.cat(grad_x, 1) if ctx.needs_input_grad[1] else None,
                grad_mean if ctx.needs_input_grad[2] else None, grad_right, None)


def _fold_rows(rows: Tensor, in_channels: int, size: tuple[int, int], kernel: tuple[int, int], images: int) -> Tensor:
    """The adjoint of `_patch_rows`: patch-row gradients `(T, n*H*W, K)` -> image gradients `(T, n, C_in, H, W)`."""
    tasks = rows.shape[0]
    columns = rows.reshape(tasks * images, size[0] * size[1], -1).transpose(1, 2)   # (T*n, K, H*W)
    folded = F.fold(columns, size, kernel, padding=(kernel[0] // 2, kernel[1] // 2))
    return folded.view(tasks, images, in_channels, *size)


def _image_chunks(x: Tensor, right: Tensor) -> list[slice]:
    """Image slices of `x (T, N, ...)`, about `_CHUNK_ELEMENTS` products per task each."""
    images, per_image = x.shape[1], x.shape[-2] * x.shape[-1]
    step = max(1, _CHUNK_ELEMENTS // (right.shape[-1] * per_image))
    return [slice(i, min(i + step, images)) for i in range(0, images, step)]


def is_fusable(block: list[nn.Module]) -> bool:
    """True for [Conv2d, BatchNorm2d, ReLU, MaxPool2d(2)] modules that `conv_bn_relu_pool` computes."""
    if len(block) != 4:
        return False
    conv = block[0]
    return (
        isinstance(conv, nn.Conv2d) and conv.kernel_size[0] == conv.kernel_size[1] and conv.kernel_size[0] % 2 == 1
        and conv.in_channels * conv.kernel_size[0] ** 2 <= _MAX_PATCH
        and conv.stride == (1, 1) and conv.padding == (conv.kernel_size[0] // 2,) * 2 and conv.dilation == (1, 1)
        and conv.groups == 1 and conv.padding_mode == "zeros"
        and is_norm_relu_pool(block[1:])
    )
