"""Shared by the meta-gradient tests: a learner's meta-gradient and a floored closeness check."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


def engine_grads(learner, batch):
    """The meta-gradient `learner.meta_loss(batch)[0].backward()` deposits, per trainable parameter."""
    learner.zero_grad(set_to_none=True)
    learner.meta_loss(batch)[0].backward()
    return [p.grad for p in learner.parameters() if p.requires_grad]


def assert_grads_close(engine, reference, tol=1e-9):
    """Each gradient within `tol` of the reference, relative to its norm floored at 1e-3 of the
    whole reference (a conv bias before BatchNorm has an exactly-zero true gradient); None = 0."""
    floor = 1e-3 * torch.cat([r.reshape(-1) for r in reference if r is not None]).norm()
    for e, r in zip(engine, reference):
        if e is None and r is None:
            continue
        e = torch.zeros_like(r) if e is None else e
        r = torch.zeros_like(e) if r is None else r
        assert (e - r).norm() <= tol * torch.maximum(r.norm(), floor)


def reference_meta_grad(learner, batch, loss=F.cross_entropy):
    """Plain per-task loop with torch.autograd.grad: the definition of the meta-gradient."""
    model = learner.model
    params = dict(model.named_parameters())
    sizes = learner.step_sizes()
    total = 0.0
    for t in range(len(batch)):
        p = dict(params)
        for _ in range(learner.inner_steps):
            inner = loss(functional_call(model, p, (batch.support_x[t],)), batch.support_y[t])
            names = list(sizes)
            grads = torch.autograd.grad(inner, [p[n] for n in names], create_graph=not learner.first_order)
            for n, g in zip(names, grads):
                p[n] = p[n] - sizes[n] * (g.detach() if learner.first_order else g)
        total = total + loss(functional_call(model, p, (batch.query_x[t],)), batch.query_y[t])
    trainable = [q for q in learner.parameters() if q.requires_grad]
    return torch.autograd.grad(total / len(batch), trainable, allow_unused=True)


def adapted_params(model, params, x, y, *, loss_fn, steps, optimizer, names, first_order=False):
    """The whole parameter dict after `steps` inner steps on `(x, y)` through the engine's one loop
    (`functional.adapt`), the entries in `names` adapted, and the support loss before adapting."""
    from fastadapt.functional import adapt, model_support_loss

    frozen = {n: p for n, p in params.items() if n not in names}
    trajectory = adapt(model_support_loss(model, x, y, loss_fn=loss_fn, frozen=frozen), {n: params[n] for n in names},
                       optimizer=optimizer, steps=steps, first_order=first_order)
    return {**frozen, **trajectory.points[-1]}, trajectory.losses[0]
