"""learn2learn's habit on the functional core: `clone = maml.clone(); clone.adapt(loss); clone(x)`.

For your own inner loop with any loss: a `Clone` holds one task's parameters as tensors that are
differentiable functions of the learner's meta-parameters (and learned inner rates), starting at
them. `clone.adapt(loss)` takes one step of the learner's inner optimizer (the engine's
`functional.inner_step`: second order unless the learner, or the call, is first order);
`clone(x)` runs the model with the current parameters; a loss of its output, `backward()`-ed,
reaches the meta-parameters. Nothing is written into the module and no private attribute is
rewritten (learn2learn's `clone` deep-copies the module and patches its `_parameters`).

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from fastadapt import MAML
    >>> maml = MAML(torch.nn.Linear(3, 2), inner_lr=0.1)
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    >>> clone = maml.clone()
    >>> clone.adapt(F.cross_entropy(clone(x), y))
    >>> F.cross_entropy(clone(x), y).backward()
    >>> maml.model.weight.grad.shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..functional import Params, forward, inner_step
from .base import Learner

__all__ = ["Clone"]


class Clone(nn.Module):
    """One task's differentiable copy of a gradient learner's parameters (`GradientLearner.clone`).

    `adapt(loss)` steps the parameters the learner adapts (all, or ANIL's head) with its inner
    optimizer at its (possibly learned, per-step) rates; MAML++'s per-step BatchNorm weights and
    statistics follow the step count. The learner is not registered as a submodule.
    """

    def __init__(self, learner: Learner, first_order: bool | None = None) -> None:
        """`learner`: a `GradientLearner` (its parameters, adapted names, inner optimizer, hooks)."""
        super().__init__()
        self.__dict__["learner"] = learner
        self.first_order = learner.first_order if first_order is None else first_order
        params = learner.meta_params()
        self.adapted: Params = {n: params[n] for n in learner.adapt_names}
        self.frozen: Params = {n: p for n, p in params.items() if n not in self.adapted}
        self.optimizer = learner.inner_optimizer_for_task()
        self.state = self.optimizer.init(self.adapted)
        self.steps = 0
        self.hooks = learner._hooks(training=learner.training)

    def params(self) -> Params:
        """The whole parameter dict at the current step (adapted, frozen and per-step entries)."""
        extra = self.hooks.params(self.steps) if self.hooks is not None else {}
        return {**self.frozen, **extra, **self.adapted}

    def forward(self, x: Tensor) -> Tensor:
        with self.hooks.context(self.steps) if self.hooks is not None else contextlib.nullcontext():
            return forward(self.learner.model, self.params(), x)

    def adapt(self, loss: Tensor, first_order: bool | None = None) -> None:
        """One inner step on `loss` (a scalar computed from this clone's outputs).

        Second order unless `first_order` (default: the clone's). Raises if `loss` does not depend
        on the adapted parameters (it was computed under `torch.no_grad()`, or from another model).
        """
        first = self.first_order if first_order is None else first_order
        names = list(self.adapted)
        if not loss.requires_grad:
            raise ValueError("clone.adapt(loss) needs a loss computed from this clone's outputs with gradients "
                             "enabled; this loss has no graph (computed under torch.no_grad()?)")
        grads = torch.autograd.grad(loss, [self.adapted[n] for n in names], create_graph=not first,
                                    allow_unused=True, materialize_grads=True)
        self.adapted, self.state = inner_step(self.adapted, dict(zip(names, grads)), self.state, self.optimizer)
        self.steps += 1
