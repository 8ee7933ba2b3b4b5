"""Adversarial attacks on functions of the input: FGSM and PGD in L-inf and L2 balls.

An attack perturbs inputs `x` to maximise an objective (the loss of `forward(x)` against labels,
or anything else: the query loss of a learner adapted on `x`). It sees a function, not a module:
it attacks an adapted learner's predictor, or `functional.forward(model, params, .)` with
per-task parameters, and never touches a module's parameters, buffers or train/eval mode (the
forward runs as it is given; fastadapt's transductive BatchNorm normalises the attacked batch by
its own statistics, as in evaluation). torchattacks and foolbox take stateful modules and switch
them to eval mode; they serve as test oracles only.

The steps follow Madry et al. 2018 (and torchattacks' PGD / PGDL2): from `x` (or a random point of
the ball), `steps` ascent steps of `step_size` along the gradient's sign (L-inf) or its normalised
direction (L2, per example), each projected back onto the ball around `x` and clamped to `bounds`.
Random starts draw from `generator`: the same generator state gives the same perturbation.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(4, 3)
    >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
    >>> x_adv = pgd(eps=0.1, steps=5)(net, x, y, generator=torch.Generator().manual_seed(0))
    >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-7), bool(((0 <= x_adv) & (x_adv <= 1)).all())
    (True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Attack", "fgsm", "pgd", "Norm", "default_loss"]

Norm = Literal["linf", "l2"]
_TINY = 1e-10  # torchattacks' eps_for_division: a zero gradient stays zero under L2 normalisation


def default_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy for integer labels (`outputs` `(..., classes)`), else mean squared error."""
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), y.reshape(-1))
    return F.mse_loss(outputs, y)


@dataclass(frozen=True)
class Attack:
    """A norm-bounded attack: `eps` the radius, `steps` ascent steps of `step_size`, optionally from a
    random point of the ball, every iterate clamped to `bounds` (None: unbounded). `targeted`:
    minimise the loss towards the given labels. The default step size scales with `eps`: `2.5 * eps
    / steps` (Madry et al.); for one step, `eps` (FGSM), or `1.25 * eps` from a random start (Wong et
    al. 2020).

    Use `fgsm(...)` and `pgd(...)` to build one.
    """

    eps: float
    norm: Norm = "linf"
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    bounds: tuple[float, float] | None = (0.0, 1.0)
    targeted: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.eps, bool) or not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps)
                                               and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"step_size must be a finite number > 0 or None, got {self.step_size!r}")
        if self.bounds is not None and not (len(self.bounds) == 2 and self.bounds[0] < self.bounds[1]):
            raise ValueError(f"bounds must be (low, high) with low < high, or None, got {self.bounds!r}")

    @property
    def alpha(self) -> float:
        """The step size."""
        if self.step_size is not None:
            return self.step_size
        if self.steps == 1:
            return 1.25 * self.eps if self.random_start else self.eps
        return 2.5 * self.eps / self.steps

    def __call__(self, forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = default_loss, batch_dims: int = 1,
                 generator: torch.Generator | None = None) -> Tensor:
        """Adversarial inputs for `forward` at `(x, y)` (`y`: the target labels if `targeted`).
        `batch_dims`: how many leading dimensions of `x` index examples (2 for a `(tasks, examples,
        ...)` stack); the L2 ball is per example."""
        return self.perturb(lambda z: loss_fn(forward(z), y), x, batch_dims=batch_dims, generator=generator)

    def perturb(self, objective: Callable[[Tensor], Tensor], x: Tensor, *, batch_dims: int = 1,
                generator: torch.Generator | None = None) -> Tensor:
        """`x` moved within the ball (and `bounds`) to maximise the scalar `objective(x)` (minimise
        it if `targeted`); detached. `eps == 0` returns `x` unchanged."""
        x = x.detach()
        if not 1 <= batch_dims < x.dim():
            raise ValueError(f"batch_dims must be >= 1 and leave at least one dimension per example; inputs "
                             f"of shape {tuple(x.shape)}, got {batch_dims}")
        if self.eps == 0:
            return x.clone()
        if self.bounds is not None and x.numel() and (x.min() < self.bounds[0] or x.max() > self.bounds[1]):
            raise ValueError(f"inputs lie in [{float(x.min()):g}, {float(x.max()):g}], outside the attack's bounds "
                             f"{tuple(self.bounds)}: give bounds=(low, high) of your inputs' valid range (or None); "
                             "clamping to bounds the inputs do not respect would leave the eps ball")
        example = tuple(range(batch_dims, x.dim()))
        adv = self._clamp(x + self._start(x, example, generator)) if self.random_start else x.clone()
        for _ in range(self.steps):
            adv.requires_grad_(True)
            with torch.enable_grad():
                value = objective(adv)
                (grad,) = torch.autograd.grad(value, adv)
            if self.targeted:
                grad = -grad
            direction = grad.sign() if self.norm == "linf" else grad / (_norms(grad, example) + _TINY)
            adv = adv.detach() + self.alpha * direction
            adv = self._clamp(x + self._project(adv - x, example))
        return adv.detach()

    def _start(self, x: Tensor, example: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        """A random point of the ball around 0 (L-inf: uniform per entry; L2: a uniform direction
        at a uniform fraction of the radius, as torchattacks' PGDL2)."""
        if self.norm == "linf":
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
            return (noise * self.eps).to(x.device)
        direction = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        radius = torch.rand(_norms(direction, example).shape, generator=generator, dtype=x.dtype)
        return (direction * (radius * self.eps / _norms(direction, example))).to(x.device)

    def _project(self, delta: Tensor, example: tuple[int, ...]) -> Tensor:
        if self.norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        factor = torch.clamp(self.eps / _norms(delta, example), max=1.0)  # a zero delta: inf -> 1
        return delta * factor

    def _clamp(self, x: Tensor) -> Tensor:
        return x if self.bounds is None else x.clamp(*self.bounds)


def _norms(t: Tensor, example: tuple[int, ...]) -> Tensor:
    """Per-example L2 norms, shaped to broadcast against `t`."""
    return torch.linalg.vector_norm(t, dim=example, keepdim=True)


def fgsm(eps: float, *, random_start: bool = False, bounds: tuple[float, float] | None = (0.0, 1.0),
         targeted: bool = False) -> Attack:
    """Fast gradient sign method (Goodfellow et al. 2015): one L-inf step of `eps`; with
    `random_start`, from a uniform point of the ball with a step of `1.25 * eps` (Wong et al. 2020,
    the cheap attack for adversarial training).

    Example:
        >>> fgsm(0.1).steps, fgsm(0.1, random_start=True).alpha
        (1, 0.125)
    """
    return Attack(eps, "linf", steps=1, random_start=random_start, bounds=bounds, targeted=targeted)


def pgd(eps: float, *, norm: Norm = "linf", steps: int = 10, step_size: float | None = None,
        random_start: bool = True, bounds: tuple[float, float] | None = (0.0, 1.0),
        targeted: bool = False) -> Attack:
    """Projected gradient descent (Madry et al. 2018) in an L-inf or L2 ball of radius `eps`.

    Example:
        >>> pgd(0.3, norm="l2", steps=20).alpha
        0.0375
    """
    return Attack(eps, norm, steps=steps, step_size=step_size, random_start=random_start, bounds=bounds,
                  targeted=targeted)
