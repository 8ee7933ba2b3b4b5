"""The first conv block, conv3x3 -> BatchNorm (batch statistics) -> ReLU -> max-pool 2, reordered.

Why: in a Conv4 pass on Omniglot the first block took ~70% of the time (profiled: BatchNorm,
ReLU, max-pool and their backwards over 64 x 28 x 28 maps per image, all memory-bound) while
holding ~5% of the FLOPs. Its input has few channels, so the conv output's statistics come from
the K = C_in * 9 dimensional input patches, and the full-resolution maps need not go through
BatchNorm and ReLU at all:

- BatchNorm's per-channel affine map is monotonic (increasing where gamma/sigma >= 0), and so is
  ReLU, so max-pool commutes with both: pool the conv output (the max, or the min where the scale
  is negative) and normalise only the pooled quarter.
- Mean and variance of the conv output come from the patch mean m and covariance S (K x K):
  E[y] = w.m (+ bias, which BatchNorm removes), Var[y] = w' S w.

Plain torch ops, so autograd differentiates it to any order (second-order MAML's inner loop
included). Exact in exact arithmetic (the float64 tests compare it with PyTorch's layers to
1e-12); in floating point a max-pool tie PyTorch breaks one way may break the other, as between
any two correct implementations.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["conv_bn_relu_pool", "tasks_conv_bn_relu_pool", "fused_forward", "set_fusion", "is_fusable"]

# Up to this patch size (C_in * kh * kw) the reordering beats PyTorch's layers (RGB 3x3 is 27).
_MAX_PATCH = 32


def conv_bn_relu_pool(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """`max_pool2d(relu(batch_norm(conv2d(x, weight, padding=k//2), training=True)), 2)`, reordered.

    The conv bias is left out: BatchNorm with batch statistics removes it exactly (its gradient
    is zero). Runs in float32 (or float64) also under bf16 autocast: the work is memory-bound
    and the statistics need the precision. `tasks_conv_bn_relu_pool` is the same for T weight sets.

    Example:
        >>> x, w = torch.rand(4, 1, 8, 8), torch.randn(3, 1, 3, 3)
        >>> g, b = torch.ones(3), torch.zeros(3)
        >>> ref = F.max_pool2d(F.relu(F.batch_norm(F.conv2d(x, w, padding=1), None, None, g, b, True)), 2)
        >>> torch.allclose(conv_bn_relu_pool(x, w, g, b), ref, atol=1e-5)
        True
    """
    return tasks_conv_bn_relu_pool(x[None], weight[None], gamma[None], beta[None], eps)[0]


def tasks_conv_bn_relu_pool(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """`conv_bn_relu_pool` of T tasks at once: `x (T, N, C_in, H, W)`, `weight (T, C, C_in, k, k)`,
    `gamma, beta (T, C)` -> `(T, N, C, H // 2, W // 2)`, each task with its own batch statistics."""
    with torch.autocast(x.device.type, enabled=False):
        dtype = torch.promote_types(weight.dtype, torch.float32)
        x, weight, gamma, beta = (t.to(dtype) for t in (x, weight, gamma, beta))
        tasks, n, _, h, w = x.shape
        channels, kernel = weight.shape[1], weight.shape[-2:]
        patches = F.unfold(x.flatten(0, 1), kernel, padding=(kernel[0] // 2, kernel[1] // 2))   # (T*N, K, H*W)
        patches = patches.view(tasks, n, -1, h * w).transpose(2, 3).reshape(tasks, n * h * w, -1)  # (T, N*H*W, K)
        mean_patch = patches.mean(1, keepdim=True)                                    # (T, 1, K)
        centred = patches - mean_patch
        covariance = centred.transpose(1, 2) @ centred / patches.shape[1]             # (T, K, K)
        w2 = weight.reshape(tasks, channels, -1)                                      # (T, C, K)
        rstd = (((w2 @ covariance) * w2).sum(2) + eps).rsqrt()                      # (T, C): 1 / sigma of the conv output
        sign = torch.where(gamma * rstd < 0, -1.0, 1.0).to(dtype).detach()
        # The conv output times the sign of BatchNorm's scale, channels last; the pool picks winners.
        # (A contiguous K x C right factor: its gradient is then patches' @ grad, 5-20x faster
        # here than the transposed product autograd picks for a transposed view.)
        right = (w2 * sign[..., None]).transpose(1, 2).contiguous()                  # (T, K, C)
        best = _pooled_conv(patches, right, h, w)                                     # (T, N, C, H/2, W/2)

        def per_channel(v: Tensor) -> Tensor:
            return v.reshape(tasks, 1, channels, 1, 1)

        centre = (mean_patch @ w2.transpose(1, 2)).squeeze(1)                         # (T, C): mean of the conv output
        yhat = (best * per_channel(sign) - per_channel(centre)) * per_channel(rstd)
        return F.relu(per_channel(gamma) * yhat + per_channel(beta))


_CACHE: "weakref.WeakKeyDictionary[nn.Module, Callable | None]" = weakref.WeakKeyDictionary()


def set_fusion(model: nn.Module, enabled: bool) -> None:
    """Turns the reordered first block on (the default where recognised) or off for `model`."""
    _CACHE[model] = _build(model) if enabled else None


def fused_forward(model: nn.Module) -> Callable[[dict[str, Tensor], Tensor], Tensor] | None:
    """A forward for `model` with its first conv block reordered, or None if it has no such block.

    Recognised: a `fastadapt.nn.Conv4` (a `features` Sequential then an optional `head`) whose
    first block is Conv2d (odd square kernel, stride 1, same zero padding, no groups or dilation,
    C_in * k * k <= 32) -> BatchNorm2d (affine, batch statistics) -> ReLU -> MaxPool2d(2).

    Example:
        >>> from fastadapt.nn import Conv4
        >>> model = Conv4.omniglot(ways=5)
        >>> run = fused_forward(model)
        >>> x = torch.rand(3, 1, 28, 28)
        >>> torch.allclose(run(dict(model.named_parameters()), x), model(x), atol=1e-5)
        True
    """
    if model not in _CACHE:
        _CACHE[model] = _build(model)
    return _CACHE[model]


def _build(model: nn.Module) -> Callable[[dict[str, Tensor], Tensor], Tensor] | None:
    from ..nn import Conv4

    if not isinstance(model, Conv4) or not is_fusable(list(model.features.children())[:4]):
        return None
    eps = model.features[1].eps
    rest = [(f"features.{name}.", module) for name, module in list(model.features.named_children())[4:]]
    if model.head is not None:
        rest.append(("head.", model.head))

    def run(params: dict[str, Tensor], x: Tensor) -> Tensor:
        first = [params[n] if n in params else model.get_parameter(n)
                 for n in ("features.0.weight", "features.1.weight", "features.1.bias")]
        h = conv_bn_relu_pool(x, *first, eps)
        for prefix, module in rest:
            local = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
            h = functional_call(module, local, (h,)) if local else module(h)
        return h

    return run


def _pooled_conv(patches: Tensor, right: Tensor, h: int, w: int) -> Tensor:
    """max_pool2d of `patches @ right` laid out as images: `(T, n*h*w, K) -> (T, n, C, h//2, w//2)`."""
    tasks, rows, channels = patches.shape[0], patches.shape[1], right.shape[-1]
    product = patches[0] @ right[0] if tasks == 1 else patches @ right  # mm beats a one-task bmm
    pooled = F.max_pool2d(product.view(-1, h, w, channels).permute(0, 3, 1, 2), 2)
    return pooled.view(tasks, rows // (h * w), *pooled.shape[1:])


def is_fusable(block: list[nn.Module]) -> bool:
    """True for [Conv2d, BatchNorm2d, ReLU, MaxPool2d(2)] modules that `conv_bn_relu_pool` computes."""
    if len(block) != 4:
        return False
    conv, norm, act, pool = block
    return (
        isinstance(conv, nn.Conv2d) and conv.kernel_size[0] == conv.kernel_size[1] and conv.kernel_size[0] % 2 == 1
        and conv.in_channels * conv.kernel_size[0] ** 2 <= _MAX_PATCH
        and conv.stride == (1, 1) and conv.padding == (conv.kernel_size[0] // 2,) * 2 and conv.dilation == (1, 1)
        and conv.groups == 1 and conv.padding_mode == "zeros"
        and isinstance(norm, nn.BatchNorm2d) and norm.affine and not norm.track_running_stats
        and type(act) is nn.ReLU
        and isinstance(pool, nn.MaxPool2d) and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
        and pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
        and not pool.return_indices
    )
