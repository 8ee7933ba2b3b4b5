"""Differentiable inner-loop optimizers: pure `init` / `update` pairs (the Optax / TorchOpt shape).

An optimizer is an `InnerOptimizer(init, update)`:

    state = opt.init(params)                                   # params: {name: Tensor}
    params, state = opt.update(grads, state, params)          # new dicts; inputs untouched

Everything is out-of-place tensor arithmetic, so the outer autograd graph flows through every
update (second-order MAML through SGD, momentum or Adam, Adam's moments included) and the
functions work under `torch.func.vmap` (no `.item()`, no branch on tensor values; the step count
is a Python int). Adam's square root is guarded at zero (`safe_sqrt`): the plain `sqrt`'s
derivative is infinite there and turns exact-zero gradient entries into NaN meta-gradients, a
known failure of higher and TorchOpt.

The learning rate `lr` may be a number, a tensor (e.g. learned), a dict of either per parameter
name (Meta-SGD's per-parameter rates), or a list of those, one per inner step (MAML++'s per-step
rates; step `k` of the state's count uses `lr[k]`).

Example:
    >>> import torch
    >>> opt = adam(0.1)
    >>> params = {"w": torch.ones(2)}
    >>> state = opt.init(params)
    >>> new, state = opt.update({"w": torch.tensor([1.0, -1.0])}, state, params)
    >>> new["w"]
    tensor([0.9000, 1.1000])
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple, Sequence, Union

import torch
from torch import Tensor

__all__ = ["InnerOptimizer", "LearningRate", "sgd", "momentum", "adam", "safe_sqrt", "make_inner_optimizer",
           "INNER_OPTIMIZERS"]

Params = dict[str, Tensor]
Rate = Union[float, Tensor]
LearningRate = Union[Rate, Mapping[str, Rate], Sequence[Union[Rate, Mapping[str, Rate]]]]


class InnerOptimizer(NamedTuple):
    """`init(params) -> state` and `update(grads, state, params) -> (new_params, new_state)`."""

    init: Callable[[Params], tuple]
    update: Callable[[Params, tuple, Params], tuple[Params, tuple]]


class SGDState(NamedTuple):
    count: int


class MomentumState(NamedTuple):
    count: int
    velocity: Params


class AdamState(NamedTuple):
    count: int
    mu: Params
    nu: Params


def sgd(lr: LearningRate) -> InnerOptimizer:
    """`p - lr * g`, as `torch.optim.SGD(lr=lr)`.

    Example:
        >>> opt = sgd({"w": 0.5})
        >>> opt.update({"w": torch.ones(1)}, opt.init({"w": torch.zeros(1)}), {"w": torch.zeros(1)})[0]
        {'w': tensor([-0.5000])}
    """
    rates = _Rates(lr)

    def init(params: Params) -> SGDState:
        return SGDState(0)

    def update(grads: Params, state: SGDState, params: Params) -> tuple[Params, SGDState]:
        _same_names(grads, params)
        lrs = rates.at(state.count, params)
        return {n: p - lrs[n] * grads[n] for n, p in params.items()}, SGDState(state.count + 1)

    return InnerOptimizer(init, update)


def momentum(lr: LearningRate, beta: float = 0.9, nesterov: bool = False) -> InnerOptimizer:
    """Heavy-ball momentum, as `torch.optim.SGD(lr, momentum=beta, nesterov=nesterov)` (no dampening).

    `v <- beta * v + g`, then `p - lr * v` (or `p - lr * (g + beta * v)` with Nesterov).

    Example:
        >>> opt = momentum(1.0, beta=0.5)
        >>> p, s = {"w": torch.zeros(1)}, None
        >>> s = opt.init(p)
        >>> for _ in range(2):
        ...     p, s = opt.update({"w": torch.ones(1)}, s, p)
        >>> p["w"]  # -1, then -1 - 1.5
        tensor([-2.5000])
    """
    rates = _Rates(lr)
    _check_unit_interval("beta", beta)
    if nesterov and beta == 0:
        raise ValueError("nesterov momentum needs beta > 0, got beta=0")

    def init(params: Params) -> MomentumState:
        return MomentumState(0, {n: torch.zeros_like(p) for n, p in params.items()})

    def update(grads: Params, state: MomentumState, params: Params) -> tuple[Params, MomentumState]:
        _same_names(grads, params)
        lrs = rates.at(state.count, params)
        velocity = {n: beta * state.velocity[n] + grads[n] for n in params}
        direction = {n: grads[n] + beta * velocity[n] for n in params} if nesterov else velocity
        new = {n: p - lrs[n] * direction[n] for n, p in params.items()}
        return new, MomentumState(state.count + 1, velocity)

    return InnerOptimizer(init, update)


def adam(lr: LearningRate, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> InnerOptimizer:
    """Adam with bias correction, as `torch.optim.Adam(lr, betas, eps)`; NaN-safe to any order.

    `p - lr * m_hat / (safe_sqrt(v_hat) + eps)`: the derivative of the root at `v_hat = 0` (an
    entry whose gradients were all exactly zero) is taken as 0 instead of infinity.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> opt = adam(0.1)
        >>> g = torch.autograd.grad((w ** 2).sum() * 0, w, create_graph=True)[0]  # exact zeros
        >>> new, _ = opt.update({"w": g}, opt.init({"w": w}), {"w": w})
        >>> torch.autograd.grad(new["w"].sum(), w)[0]
        tensor([1., 1.])
    """
    rates = _Rates(lr)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    _check_unit_interval("betas[0]", betas[0])
    _check_unit_interval("betas[1]", betas[1])
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    beta1, beta2 = float(betas[0]), float(betas[1])

    def init(params: Params) -> AdamState:
        return AdamState(0, {n: torch.zeros_like(p) for n, p in params.items()},
                         {n: torch.zeros_like(p) for n, p in params.items()})

    def update(grads: Params, state: AdamState, params: Params) -> tuple[Params, AdamState]:
        _same_names(grads, params)
        lrs = rates.at(state.count, params)
        count = state.count + 1
        correction1, correction2 = 1 - beta1 ** count, 1 - beta2 ** count
        mu = {n: beta1 * state.mu[n] + (1 - beta1) * grads[n] for n in params}
        nu = {n: beta2 * state.nu[n] + (1 - beta2) * grads[n] * grads[n] for n in params}
        new = {n: p - (lrs[n] / correction1) * mu[n] / (safe_sqrt(nu[n] / correction2) + eps)
               for n, p in params.items()}
        return new, AdamState(count, mu, nu)

    return InnerOptimizer(init, update)


def safe_sqrt(x: Tensor) -> Tensor:
    """`sqrt(x)` for `x >= 0` whose derivative at 0 is 0 (not infinity), at every order.

    Both branches of `where` are finite: the root never sees a zero, so no `inf * 0 = NaN`
    reaches the gradient. vmap-safe (no branch on values).

    Example:
        >>> x = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> torch.autograd.grad(safe_sqrt(x).sum(), x)[0]
        tensor([0.0000, 0.2500])
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


INNER_OPTIMIZERS: dict[str, Callable[[LearningRate], InnerOptimizer]] = {"sgd": sgd, "momentum": momentum, "adam": adam}


def make_inner_optimizer(name: str, lr: LearningRate) -> InnerOptimizer:
    """The optimizer called `name` ("sgd", "momentum" or "adam", default hyperparameters) at rate `lr`.

    Example:
        >>> make_inner_optimizer("momentum", 0.1).init({"w": torch.zeros(2)}).count
        0
    """
    if name not in INNER_OPTIMIZERS:
        raise ValueError(f"inner_optimizer must be one of {', '.join(INNER_OPTIMIZERS)}; got {name!r}")
    return INNER_OPTIMIZERS[name](lr)


class _Rates:
    """The learning-rate spec, checked once; `at(step, params)` gives one rate per parameter name."""

    def __init__(self, lr: LearningRate) -> None:
        if isinstance(lr, (list, tuple)):
            if not lr:
                raise ValueError("lr as a per-step list needs at least one entry, got an empty list")
            for entry in lr:
                _check_rate_spec(entry, per_step=True)
        else:
            _check_rate_spec(lr, per_step=False)
        self.lr = lr

    def at(self, step: int, params: Params) -> Mapping[str, Rate]:
        spec = self.lr
        if isinstance(spec, (list, tuple)):
            if step >= len(spec):
                raise ValueError(f"the optimizer has per-step learning rates for {len(spec)} steps; "
                                 f"step {step + 1} was asked for (use at most {len(spec)} inner steps)")
            spec = spec[step]
        if isinstance(spec, Mapping):
            missing = sorted(set(params) - set(spec))
            if missing:
                raise ValueError(f"lr has no rate for parameter(s) {missing}; it names {sorted(spec)}")
            return spec
        return {n: spec for n in params}


def _check_rate_spec(spec: object, per_step: bool) -> None:
    inner = " (in the per-step list)" if per_step else ""
    if isinstance(spec, Mapping):
        for name, rate in spec.items():
            _check_rate(f"lr[{name!r}]{inner}", rate)
    elif isinstance(spec, (list, tuple)):
        raise ValueError(f"lr{inner} must be a number, tensor or dict of them, got a nested {type(spec).__name__}")
    else:
        _check_rate(f"lr{inner}", spec)


def _check_rate(label: str, rate: object) -> None:
    if isinstance(rate, Tensor):
        if not rate.is_floating_point():
            raise ValueError(f"{label} must be a floating-point tensor, got dtype {rate.dtype}")
        return
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"{label} must be a finite number > 0 (or a tensor), got {rate!r}")


def _check_unit_interval(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{label} must be a number in [0, 1), got {value!r}")


def _same_names(grads: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    if grads.keys() != params.keys():
        raise ValueError(f"grads and params name different tensors: grads has {sorted(grads)}, "
                         f"params has {sorted(params)}")
