"""Differentiable inner-loop optimizers as gradient transformations (the Optax / TorchOpt shape).

A `GradientTransformation(init, update)` turns gradients into updates; `apply_updates` adds them:

    state = opt.init(params)                          # params: {name: Tensor}
    updates, state = opt.update(grads, state, params)  # new dicts; inputs untouched
    params = apply_updates(params, updates)           # p + u

Building blocks (`scale_by_lr`, `trace`, `scale_by_adam`, `clip_by_global_norm`,
`add_decayed_weights`) combine with `chain`; `sgd`, `momentum` and `adam` are such chains.
Everything is out-of-place tensor arithmetic, so the outer autograd graph flows through every
update (second-order MAML through SGD, momentum or Adam, Adam's moments included) and the
functions work under `torch.func.vmap` (no `.item()`, no branch on tensor values; step counts
are Python ints). Adam's square root is guarded at zero (`safe_sqrt`): the plain `sqrt`'s
derivative is infinite there and turns exact-zero gradient entries into NaN meta-gradients, a
known failure of higher and TorchOpt.

The learning rate `lr` may be a number, a tensor (e.g. learned), a dict of either per parameter
name (Meta-SGD's per-parameter rates), or a list of those, one per inner step (MAML++'s per-step
rates; step `k` of `scale_by_lr`'s count uses `lr[k]`).

Example:
    >>> import torch
    >>> opt = chain(clip_by_global_norm(1.0), trace(0.9), scale_by_lr(0.1))
    >>> params = {"w": torch.ones(2)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": torch.tensor([3.0, 4.0])}, state, params)
    >>> apply_updates(params, updates)["w"]  # the gradient clipped to norm 1: (0.6, 0.8)
    tensor([0.9400, 0.9200])
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence, TypeVar, Union

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["GradientTransformation", "LearningRate", "EmptyState", "ScaleByLrState", "TraceState", "AdamState",
           "apply_updates", "chain", "scale_by_lr", "trace", "scale_by_adam", "clip_by_global_norm",
           "add_decayed_weights", "sgd", "momentum", "adam", "per_task", "find_state", "replace_state", "safe_sqrt",
           "make_inner_optimizer", "INNER_OPTIMIZERS"]

Params = dict[str, Tensor]
Rate = Union[float, Tensor]
LearningRate = Union[Rate, Mapping[str, Rate], Sequence[Union[Rate, Mapping[str, Rate]]]]
State = TypeVar("State")


class GradientTransformation(NamedTuple):
    """`init(params) -> state` and `update(grads, state, params=None) -> (updates, new_state)`.

    `elementwise`: every update entry depends only on the same entry of the gradients, state and
    parameters (no norm over them), so it applies to several tasks' parameters stacked on a leading
    dimension as they are; False (the safe default for your own) makes `per_task` vmap it.
    """

    init: Callable[[Params], Any]
    update: Callable[..., tuple[Params, Any]]
    elementwise: bool = False


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none."""


class ScaleByLrState(NamedTuple):
    """`scale_by_lr`'s step count (it picks the per-step rate)."""

    count: int


class TraceState(NamedTuple):
    """`trace`'s velocity per tensor, and its step count (dampening spares the first step)."""

    velocity: Params
    count: int = 0


class AdamState(NamedTuple):
    """`scale_by_adam`'s step count (for the bias correction) and first and second moments."""

    count: int
    mu: Params
    nu: Params


def apply_updates(params: Mapping[str, Tensor], updates: Mapping[str, Tensor]) -> Params:
    """`p + u` for every parameter, out of place.

    Example:
        >>> apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})
        {'w': tensor([1.5000, 0.0000])}
    """
    _same_names(updates, params, "updates")
    return {n: p + updates[n] for n, p in params.items()}


def chain(*transformations: GradientTransformation) -> GradientTransformation:
    """The transformations one after another; the state is the tuple of their states.

    Example:
        >>> opt = chain(trace(0.5), scale_by_lr(1.0))
        >>> opt.update({"w": torch.ones(1)}, opt.init({"w": torch.zeros(1)}))[0]
        {'w': tensor([-1.])}
    """
    for index, t in enumerate(transformations):
        if not isinstance(t, GradientTransformation):
            raise ValueError(f"chain takes GradientTransformations; argument {index} is {t!r}")

    def init(params: Params) -> tuple:
        return tuple(t.init(params) for t in transformations)

    def update(grads: Params, state: tuple, params: Params | None = None) -> tuple[Params, tuple]:
        if params is not None:
            _same_names(grads, params, "grads")
        states = []
        for t, inner in zip(transformations, state, strict=True):
            grads, inner = t.update(grads, inner, params)
            states.append(inner)
        return grads, tuple(states)

    return GradientTransformation(init, update, all(t.elementwise for t in transformations))


def scale_by_lr(lr: LearningRate) -> GradientTransformation:
    """`-lr * g`: the descent step at rate `lr` (a number, tensor, dict per name, or per-step list).

    Example:
        >>> opt = scale_by_lr([0.5, {"w": 0.25}])  # per-step rates
        >>> state = opt.init({"w": torch.zeros(1)})
        >>> for _ in range(2):
        ...     updates, state = opt.update({"w": torch.ones(1)}, state)
        ...     print(updates["w"])
        tensor([-0.5000])
        tensor([-0.2500])
    """
    rates = _Rates(lr)

    def init(params: Params) -> ScaleByLrState:
        return ScaleByLrState(0)

    def update(grads: Params, state: ScaleByLrState, params: Params | None = None) -> tuple[Params, ScaleByLrState]:
        lrs = rates.at(state.count, grads)
        return {n: -(lrs[n] * g) for n, g in grads.items()}, ScaleByLrState(state.count + 1)

    return GradientTransformation(init, update, elementwise=True)


def trace(beta: float = 0.9, nesterov: bool = False, dampening: float = 0.0) -> GradientTransformation:
    """Heavy-ball momentum as `torch.optim.SGD(momentum=beta, nesterov=nesterov, dampening=dampening)`.

    `v <- beta * v + (1 - dampening) * g` (the first step: `v <- g`), then `v` (or `g + beta * v`
    with Nesterov).

    Example:
        >>> opt = trace(0.5)
        >>> g, s = {"w": torch.ones(1)}, opt.init({"w": torch.zeros(1)})
        >>> for _ in range(2):
        ...     v, s = opt.update(g, s)
        >>> v["w"]  # 1, then 0.5 + 1
        tensor([1.5000])
    """
    _check_unit_interval("beta", beta)
    _check_unit_interval("dampening", dampening)
    if nesterov and (beta == 0 or dampening != 0):
        raise ValueError(f"nesterov momentum needs beta > 0 and no dampening, got beta={beta}, dampening={dampening}")

    def init(params: Params) -> TraceState:
        return TraceState({n: torch.zeros_like(p) for n, p in params.items()})

    def update(grads: Params, state: TraceState, params: Params | None = None) -> tuple[Params, TraceState]:
        if dampening and state.count == 0:
            velocity = dict(grads)
        elif dampening:
            velocity = {n: beta * state.velocity[n] + (1 - dampening) * g for n, g in grads.items()}
        else:
            velocity = {n: beta * state.velocity[n] + g for n, g in grads.items()}
        updates = {n: g + beta * velocity[n] for n, g in grads.items()} if nesterov else velocity
        return updates, TraceState(velocity, state.count + 1)

    return GradientTransformation(init, update, elementwise=True)


def scale_by_adam(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction `m_hat / (safe_sqrt(v_hat) + eps)`, bias-corrected, as `torch.optim.Adam`.

    The derivative of the root at `v_hat = 0` (an entry whose gradients were all exactly zero) is
    taken as 0 instead of infinity, so meta-gradients stay finite to any order.

    Example:
        >>> opt = scale_by_adam()
        >>> opt.update({"w": torch.tensor([2.0, -0.5])}, opt.init({"w": torch.zeros(2)}))[0]["w"]
        tensor([ 1., -1.])
    """
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    _check_unit_interval("betas[0]", betas[0])
    _check_unit_interval("betas[1]", betas[1])
    _check_positive("eps", eps)
    beta1, beta2 = float(betas[0]), float(betas[1])

    def init(params: Params) -> AdamState:
        return AdamState(0, {n: torch.zeros_like(p) for n, p in params.items()},
                         {n: torch.zeros_like(p) for n, p in params.items()})

    def update(grads: Params, state: AdamState, params: Params | None = None) -> tuple[Params, AdamState]:
        count = state.count + 1
        correction1, correction2 = 1 - beta1 ** count, 1 - beta2 ** count
        mu = {n: beta1 * state.mu[n] + (1 - beta1) * g for n, g in grads.items()}
        nu = {n: beta2 * state.nu[n] + (1 - beta2) * g * g for n, g in grads.items()}
        updates = {n: (mu[n] / correction1) / (safe_sqrt(nu[n] / correction2) + eps) for n in grads}
        return updates, AdamState(count, mu, nu)

    return GradientTransformation(init, update, elementwise=True)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scales the gradients by `min(1, max_norm / (norm + 1e-6))`, `norm` the 2-norm over all of
    them, as `torch.nn.utils.clip_grad_norm_` (without `.item()` or a branch: vmap-safe).

    Example:
        >>> opt = clip_by_global_norm(1.0)
        >>> opt.update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, opt.init({}))[0]
        {'a': tensor([0.6000]), 'b': tensor([0.8000])}
    """
    _check_positive("max_norm", max_norm)

    def update(grads: Params, state: EmptyState, params: Params | None = None) -> tuple[Params, EmptyState]:
        norm = safe_sqrt(sum((g * g).sum() for g in grads.values()))
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        return {n: g * scale for n, g in grads.items()}, state

    return GradientTransformation(_empty_init, update)


def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """`g + weight_decay * p`: the coupled weight decay of `torch.optim.SGD` and `Adam`; needs `params`.

    Example:
        >>> opt = add_decayed_weights(0.1)
        >>> p = {"w": torch.tensor([2.0])}
        >>> opt.update({"w": torch.ones(1)}, opt.init(p), p)[0]
        {'w': tensor([1.2000])}
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not (
            weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")

    def update(grads: Params, state: EmptyState, params: Params | None = None) -> tuple[Params, EmptyState]:
        if params is None:
            raise ValueError("add_decayed_weights needs the parameters: call update(grads, state, params)")
        _same_names(grads, params, "grads")
        return {n: torch.add(g, params[n], alpha=weight_decay) for n, g in grads.items()}, state

    return GradientTransformation(_empty_init, update, elementwise=True)


def sgd(lr: LearningRate, weight_decay: float = 0.0) -> GradientTransformation:
    """`p - lr * g`, as `torch.optim.SGD(lr=lr, weight_decay=weight_decay)`.

    Example:
        >>> opt, p = sgd({"w": 0.5}), {"w": torch.zeros(1)}
        >>> apply_updates(p, opt.update({"w": torch.ones(1)}, opt.init(p), p)[0])
        {'w': tensor([-0.5000])}
    """
    return chain(*_decay(weight_decay), scale_by_lr(lr))


def momentum(lr: LearningRate, beta: float = 0.9, nesterov: bool = False,
             weight_decay: float = 0.0) -> GradientTransformation:
    """Heavy-ball momentum, as `torch.optim.SGD(lr, momentum=beta, nesterov=nesterov, weight_decay=...)`.

    `v <- beta * v + g`, then `p - lr * v` (or `p - lr * (g + beta * v)` with Nesterov).

    Example:
        >>> opt = momentum(1.0, beta=0.5)
        >>> p = {"w": torch.zeros(1)}
        >>> s = opt.init(p)
        >>> for _ in range(2):
        ...     u, s = opt.update({"w": torch.ones(1)}, s, p)
        ...     p = apply_updates(p, u)
        >>> p["w"]  # -1, then -1 - 1.5
        tensor([-2.5000])
    """
    return chain(*_decay(weight_decay), trace(beta, nesterov), scale_by_lr(lr))


def adam(lr: LearningRate, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0) -> GradientTransformation:
    """Adam with bias correction, as `torch.optim.Adam(lr, betas, eps, weight_decay)`; NaN-safe to any order.

    `p - lr * m_hat / (safe_sqrt(v_hat) + eps)` (`scale_by_adam`).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> opt = adam(0.1)
        >>> g = torch.autograd.grad((w ** 2).sum() * 0, w, create_graph=True)[0]  # exact zeros
        >>> updates, _ = opt.update({"w": g}, opt.init({"w": w}), {"w": w})
        >>> torch.autograd.grad(apply_updates({"w": w}, updates)["w"].sum(), w)[0]
        tensor([1., 1.])
    """
    return chain(*_decay(weight_decay), scale_by_adam(betas, eps), scale_by_lr(lr))


def per_task(transformation: GradientTransformation) -> GradientTransformation:
    """`transformation` on the parameters of T tasks stacked on a leading dimension `(T, ...)`:
    each task's own update (`torch.func.vmap`), so a reduction over the parameters (the norm of
    `clip_by_global_norm`) stays within a task. The state's tensors are stacked per task too.

    Example:
        >>> opt, g = per_task(clip_by_global_norm(1.0)), {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
        >>> opt.update(g, opt.init(g))[0]["w"]
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
    """
    if transformation.elementwise:
        return transformation

    def init(params: Params) -> Any:
        return _over_tasks(transformation.init, params)

    def update(grads: Params, state: Any, params: Params | None = None) -> tuple[Params, Any]:
        return _over_tasks(transformation.update, grads, state, params)

    return GradientTransformation(init, update)


def find_state(state: Any, kind: type[State]) -> State:
    """The first sub-state of type `kind` in an optimizer's state (a chain's state is a tuple).

    Example:
        >>> find_state(adam(0.1).init({"w": torch.zeros(1)}), AdamState).count
        0
    """
    found = next((inner for inner in _sub_states(state) if isinstance(inner, kind)), None)
    if found is None:
        raise ValueError(f"the optimizer state holds no {kind.__name__}; got {state!r:.200}")
    return found


def replace_state(state: Any, new: NamedTuple) -> Any:
    """`state` with every sub-state of `new`'s type replaced by `new`.

    Example:
        >>> state = replace_state(adam(0.1).init({"w": torch.zeros(1)}), AdamState(7, {}, {}))
        >>> find_state(state, AdamState).count, find_state(state, ScaleByLrState).count
        (7, 0)
    """
    find_state(state, type(new))
    return _replaced(state, new)


def _sub_states(state: Any) -> Iterator[Any]:
    """`state` and, for a chain's state (a plain tuple), every state inside it, depth first."""
    yield state
    if type(state) is tuple:
        for inner in state:
            yield from _sub_states(inner)


def _replaced(state: Any, new: NamedTuple) -> Any:
    if isinstance(state, type(new)):
        return new
    if type(state) is tuple:
        return tuple(_replaced(inner, new) for inner in state)
    return state


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


INNER_OPTIMIZERS: dict[str, Callable[[LearningRate], GradientTransformation]] = {
    "sgd": sgd, "momentum": momentum, "adam": adam}


def make_inner_optimizer(name: str, lr: LearningRate) -> GradientTransformation:
    """The optimizer called `name` ("sgd", "momentum" or "adam", default hyperparameters) at rate `lr`.

    Example:
        >>> make_inner_optimizer("momentum", 0.1).init({"w": torch.zeros(2)})
        (TraceState(velocity={'w': tensor([0., 0.])}, count=0), ScaleByLrState(count=0))
    """
    if name not in INNER_OPTIMIZERS:
        raise ValueError(f"inner_optimizer must be one of {', '.join(INNER_OPTIMIZERS)}; got {name!r}")
    return INNER_OPTIMIZERS[name](lr)


def _empty_init(params: Params) -> EmptyState:
    return EmptyState()


def _decay(weight_decay: float) -> tuple[GradientTransformation, ...]:
    """`add_decayed_weights` where there is weight decay; none at 0 (plain SGD stays bit for bit)."""
    return (add_decayed_weights(weight_decay),) if weight_decay != 0 else ()


def _over_tasks(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` under vmap over the leading dimension of every tensor in `args`; the other
    leaves (step counts) go in and come out as they are."""
    leaves, spec = tree_flatten(args)
    at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    if not at:
        return fn(*args)
    result: dict[str, Any] = {}

    def on_tensors(*tensors: Tensor) -> tuple[Tensor, ...]:
        filled = list(leaves)
        for i, t in zip(at, tensors):
            filled[i] = t
        result["leaves"], result["spec"] = tree_flatten(fn(*tree_unflatten(filled, spec)))
        return tuple(leaf for leaf in result["leaves"] if isinstance(leaf, Tensor))

    outputs = iter(vmap(on_tensors)(*(leaves[i] for i in at)))
    out = [next(outputs) if isinstance(leaf, Tensor) else leaf for leaf in result["leaves"]]
    return tree_unflatten(out, result["spec"])


class _Rates:
    """The learning-rate spec, checked once; `at(step, names)` gives one rate per tensor name."""

    def __init__(self, lr: LearningRate) -> None:
        if isinstance(lr, (list, tuple)):
            if not lr:
                raise ValueError("lr as a per-step list needs at least one entry, got an empty list")
            for entry in lr:
                _check_rate_spec(entry, per_step=True)
        else:
            _check_rate_spec(lr, per_step=False)
        self.lr = lr

    def at(self, step: int, names: Mapping[str, Tensor]) -> Mapping[str, Rate]:
        spec = self.lr
        if isinstance(spec, (list, tuple)):
            if step >= len(spec):
                raise ValueError(f"the optimizer has per-step learning rates for {len(spec)} steps; "
                                 f"step {step + 1} was asked for (use at most {len(spec)} inner steps)")
            spec = spec[step]
        if isinstance(spec, Mapping):
            missing = sorted(set(names) - set(spec))
            if missing:
                raise ValueError(f"lr has no rate for parameter(s) {missing}; it names {sorted(spec)}")
            return spec
        return {n: spec for n in names}


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


def _check_positive(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{label} must be a finite number > 0, got {value!r}")


def _same_names(given: Mapping[str, Tensor], params: Mapping[str, Tensor], label: str) -> None:
    if given.keys() != params.keys():
        raise ValueError(f"{label} and params name different tensors: {label} has {sorted(given)}, "
                         f"params has {sorted(params)}")
