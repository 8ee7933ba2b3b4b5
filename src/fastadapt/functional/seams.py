"""Seams: what a learner adds to every task's inner and outer loss, on every execution path.

- `support_hook(params, x, y) -> x`: the support inputs a task's inner step `s` trains on, given
  that step's parameters (an attack that poisons the support set, augmentation, noise);
- `query_hook(params, x, y) -> x`: the query inputs the outer loss sees, given the adapted
  parameters (an attack on the adapted learner);
- `inner_term(params, step) -> scalar`: added to a task's support loss at inner step `step`
  (a regulariser, a proximal term);
- `outer_term(adapted, initial) -> scalar`: added to a task's outer loss, from its adapted and
  its initial parameters (a KL divergence, a regulariser);
- `query_term(adapted, x, y) -> scalar`: added to a task's outer loss, from its adapted
  parameters and its query set (TRADES' divergence between clean and attacked predictions).

With `hook_gradients=False` (the default) a hook sees detached parameters and its output is
data: the meta-gradient does not flow through it (adversarial training's convention); with True
it flows through the hook's dependence on the parameters. Hooks run with gradients enabled (an
attack needs them, also in evaluation) and must be deterministic functions of their arguments
(checkpointing replays the inner steps).

Each is a function of one task's tensors; on stacked task groups it is applied task by task.

Example:
    >>> import torch
    >>> seams = Seams(query_hook=lambda params, x, y: x + params["b"])
    >>> seams.query_inputs({"b": torch.ones(1, requires_grad=True)}, torch.zeros(2), None).requires_grad
    False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .inner_loop import Params

__all__ = ["Seams", "InputHook"]

InputHook = Callable[[Params, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Seams:
    """The optional per-task additions of a learner (see the module docstring)."""

    support_hook: InputHook | None = None
    query_hook: InputHook | None = None
    inner_term: Callable[[Params, int], Tensor] | None = None
    outer_term: Callable[[Params, Params], Tensor] | None = None
    hook_gradients: bool = False
    query_term: Callable[[Params, Tensor, Tensor], Tensor] | None = None

    @property
    def active(self) -> bool:
        """Whether any seam is set."""
        return any(f is not None for f in (self.support_hook, self.query_hook, self.inner_term, self.outer_term,
                                           self.query_term))

    def support_inputs(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """One task's support inputs through `support_hook` (unchanged without one)."""
        return self._through(self.support_hook, params, x, y)

    def query_inputs(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """One task's query inputs through `query_hook` (unchanged without one)."""
        return self._through(self.query_hook, params, x, y)

    def stacked_support_inputs(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """`support_inputs` of T tasks stacked on the leading dimension of `params`, `x` and `y`."""
        if self.support_hook is None:
            return x
        return torch.stack([self.support_inputs({n: p[t] for n, p in params.items()}, x[t], y[t])
                            for t in range(x.shape[0])])

    def inner(self, params: Params, step: int) -> Tensor | float:
        """One task's inner term at `step` (0 without one)."""
        return 0.0 if self.inner_term is None else self.inner_term(params, step)

    def stacked_inner(self, params: Params, step: int, tasks: int) -> Tensor | float:
        """`inner` of T stacked tasks, `(T,)` (0 without one)."""
        if self.inner_term is None:
            return 0.0
        return torch.stack([self.inner_term({n: p[t] for n, p in params.items()}, step) for t in range(tasks)])

    def outer(self, adapted: Params, initial: Params) -> Tensor | float:
        """One task's outer term (0 without one)."""
        return 0.0 if self.outer_term is None else self.outer_term(adapted, initial)

    def query(self, adapted: Params, x: Tensor, y: Tensor) -> Tensor | float:
        """One task's query term at its adapted parameters and clean query set (0 without one)."""
        return 0.0 if self.query_term is None else self.query_term(adapted, x, y)

    def _through(self, hook: InputHook | None, params: Params, x: Tensor, y: Tensor) -> Tensor:
        if hook is None:
            return x
        with torch.enable_grad():
            if self.hook_gradients:
                return hook(params, x, y)
            out = hook({n: p.detach() for n, p in params.items()}, x, y)
            return out if out is x else out.detach()  # inputs passed through unchanged keep their own graph
