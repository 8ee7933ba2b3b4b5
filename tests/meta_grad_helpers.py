"""Shared by the meta-gradient tests: a learner's meta-gradient and a floored closeness check."""

from __future__ import annotations

import torch


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
