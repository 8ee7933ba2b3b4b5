"""Stein variational gradient descent (Liu & Wang 2016) as a gradient transformation.

M particles, stacked on the leading dimension of every parameter tensor, move along
`phi(x_i) = 1/M sum_j [k(x_j, x_i) grad log p(x_j) + grad_{x_j} k(x_j, x_i)]`: the kernel-smoothed
gradient (attraction to high density) plus the kernel's gradient (repulsion between particles).
The kernel is RBF, `k(x, y) = exp(-|x - y|^2 / h)` with the median heuristic
`h = median(|x_i - x_j|^2) / log(M + 1)` (differentiated as the entry the median picks). `svgd(lr)` takes the
gradients of a loss `-log p` (what the inner loop differentiates) and returns `lr * phi`, so it
plugs into `functional.adapt` as any inner optimizer, differentiable to second order.

Example:
    >>> particles = {"x": torch.tensor([[0.0], [1.0]])}
    >>> opt = svgd(0.1)
    >>> updates, _ = opt.update({"x": particles["x"] - 3.0}, opt.init(particles), particles)  # -log p = (x - 3)^2 / 2
    >>> bool((updates["x"] > 0).all())
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..functional import Params
from ..functional.optim import EmptyState, GradientTransformation

__all__ = ["rbf_kernel", "svgd_direction", "svgd"]


def rbf_kernel(particles: Tensor, bandwidth: float | None = None) -> tuple[Tensor, Tensor]:
    """The kernel matrix `K[j, i] = k(x_j, x_i)` of particles `(M, D)` and the repulsion
    `sum_j grad_{x_j} k(x_j, x_i)`, `(M, D)`; `bandwidth` None: the median heuristic."""
    squared = (particles.unsqueeze(1) - particles.unsqueeze(0)).pow(2).sum(-1)  # exact, differentiable at 0
    if bandwidth is None:
        m = particles.shape[0]
        median = squared.flatten().median() if m > 1 else squared.new_ones(())
        h = (median / math.log(m + 1)).clamp(min=1e-12)
    else:
        h = torch.as_tensor(bandwidth, dtype=particles.dtype)
    kernel = torch.exp(-squared / h)
    # grad_{x_j} k(x_j, x_i) = -2 (x_j - x_i) / h * k; summed over j
    repulsion = 2 / h * (particles * kernel.sum(0, keepdim=True).T - kernel.T @ particles)
    return kernel, repulsion


def svgd_direction(particles: Tensor, log_prob_grads: Tensor, bandwidth: float | None = None) -> Tensor:
    """`phi` for particles `(M, D)` given `grad log p` at each, `(M, D)` (see the module docstring)."""
    kernel, repulsion = rbf_kernel(particles, bandwidth)
    return (kernel.T @ log_prob_grads + repulsion) / particles.shape[0]


def svgd(lr: float, bandwidth: float | None = None) -> GradientTransformation:
    """SVGD at step size `lr` over particles stacked on every tensor's leading dimension; the
    gradients given are those of `-log p` (a loss). All tensors together form one particle."""

    def init(params: Params) -> EmptyState:
        return EmptyState()

    def update(grads: Params, state: EmptyState, params: Params | None = None) -> tuple[Params, EmptyState]:
        if params is None:
            raise ValueError("svgd needs the particles (params) to compute its kernel")
        names = list(params)
        m = params[names[0]].shape[0]
        flat = torch.cat([params[n].reshape(m, -1) for n in names], 1)
        direction = svgd_direction(flat, -torch.cat([grads[n].reshape(m, -1) for n in names], 1), bandwidth)
        updates, start = {}, 0
        for n in names:
            size = params[n][0].numel()
            updates[n] = lr * direction[:, start:start + size].reshape(params[n].shape)
            start += size
        return updates, state

    return GradientTransformation(init, update, elementwise=False)
