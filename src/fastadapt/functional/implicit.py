"""The implicit meta-gradient rule (iMAML): conjugate gradient on Hessian-vector products.

Where the inner loop approximately solves the proximal problem
`φ*(θ) = argmin_φ L_s(φ) + λ/2 ||φ - θ||²`, the implicit function theorem gives
`dφ*/dθ = (I + H/λ)⁻¹` at a stationary point, `H` the Hessian of the support loss at `φ*`. The
task's meta-gradient is then the solution `g` of

    (I + (H + damping·I)/λ) g = ∇L_q(φ*)

whatever path the inner loop took to `φ*`: no trajectory is kept, memory holds one support graph.
`implicit_meta_gradient` solves it by `cg_steps` iterations of `conjugate_gradient`, each one
Hessian-vector product (a double backward through the support loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .inner_loop import Params

__all__ = ["conjugate_gradient", "implicit_meta_gradient"]

Vectors = list[Tensor]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor], batched: bool) -> Tensor:
    """Inner product of two vectors (lists of tensors); per task `(T,)` if `batched`."""
    if batched:
        return sum((x * y).reshape(x.shape[0], -1).sum(1) for x, y in zip(a, b))  # type: ignore[return-value]
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def _per(coefficient: Tensor, t: Tensor) -> Tensor:
    """A scalar, or one per task `(T,)`, shaped to broadcast over `t`."""
    return coefficient.reshape(*coefficient.shape, *[1] * (t.dim() - coefficient.dim()))


def conjugate_gradient(matvec: Callable[[Vectors], Vectors], b: Sequence[Tensor], steps: int,
                       batched: bool = False) -> Vectors:
    """`steps` iterations of conjugate gradient for `A x = b` from x = 0; `A` symmetric, given by `matvec`.

    `batched`: T independent systems stacked on the leading dimension of every tensor (a
    block-diagonal `A`), each with its own step sizes, as T separate solves would take them.

    Vectors are lists of tensors (one per parameter). No `.item()` sync: where a search direction
    meets non-positive curvature (`p'Ap <= 0`, an indefinite `A`) or the residual is exactly zero,
    the iteration stops in place (truncated CG), so the result is always finite.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x = conjugate_gradient(lambda v: [A @ v[0]], [torch.tensor([1.0, 2.0], dtype=torch.float64)], 2)
        >>> torch.allclose(A @ x[0], torch.tensor([1.0, 2.0], dtype=torch.float64))
        True
    """
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = _dot(r, r, batched)
    active = rs > 0
    for _ in range(steps):
        ap = matvec(p)
        curvature = _dot(p, ap, batched)
        active = active & (curvature > 0)
        alpha = torch.where(active, rs / torch.where(active, curvature, 1.0), 0.0)
        x = [xi + _per(alpha, pi) * pi for xi, pi in zip(x, p)]
        r = [ri - _per(alpha, api) * api for ri, api in zip(r, ap)]
        rs_new = _dot(r, r, batched)
        active = active & (rs_new > 0)
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
        p = [ri + _per(beta, pi) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x


def implicit_meta_gradient(support_loss: Callable[[Params], Tensor], adapted: Params, query_gradient: Sequence[Tensor],
                           *, lam: float, cg_steps: int, damping: float = 0.0, batched: bool = False) -> Vectors:
    """The implicit meta-gradient at the adapted parameters: CG on `(I + (H + damping·I)/lam) g = query_gradient`.

    `support_loss(φ)` is the support loss (its sum over tasks when `batched`: T tasks stacked on the
    leading dimension of every parameter, each solving its own system); `H` is its Hessian at
    `adapted`. `query_gradient` holds one tensor per entry of `adapted`. Returns `g` (detached), in
    the same order. Entries the support loss does not depend on (a conv bias BatchNorm removes)
    have zero Hessian rows.

    Example:
        >>> w = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
        >>> g = implicit_meta_gradient(lambda p: (p["w"] ** 2).sum(), w, [torch.ones(2, dtype=torch.float64)],
        ...                            lam=2.0, cg_steps=2)
        >>> g[0]  # (I + 2I/2)^-1 · 1
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    names = list(adapted)
    with torch.enable_grad():
        leaves = [adapted[n].detach().requires_grad_(True) for n in names]
        total = support_loss(dict(zip(names, leaves))).sum()
        support_grad = torch.autograd.grad(total, leaves, create_graph=True, materialize_grads=True)
        linked = [i for i, s in enumerate(support_grad) if s.requires_grad]
        scale = 1.0 / lam

        def matvec(u: Vectors) -> Vectors:
            hvp = torch.autograd.grad([support_grad[i] for i in linked], leaves, grad_outputs=[u[i] for i in linked],
                                      retain_graph=True, materialize_grads=True)
            return [ui + scale * (hi + damping * ui) for ui, hi in zip(u, hvp)]

        g = conjugate_gradient(matvec, list(query_gradient), cg_steps, batched=batched)
    return [t.detach() for t in g]
