"""Seams on every execution path: a loss of yours, input hooks, per-task initial parameters and
extra terms change the meta-gradient exactly as the per-task reference loop with the same change
(float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fastadapt import MAML, TaskBatch
from fastadapt.nn import MLP, Conv4
from meta_grad_helpers import assert_grads_close

pytestmark = pytest.mark.usefixtures("float64")

PATHS = ["loop", "loop-checkpointed", "per-task", "per-task-checkpointed", "graph"]
TASKS = 3


def _batch(seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    ways, shots, queries = 3, 2, 3
    return TaskBatch(torch.rand(TASKS, ways * shots, 1, 16, 16, generator=g),
                     torch.arange(ways).repeat_interleave(shots).expand(TASKS, -1).contiguous(),
                     torch.rand(TASKS, ways * queries, 1, 16, 16, generator=g),
                     torch.arange(ways).repeat_interleave(queries).expand(TASKS, -1).contiguous())


def _conv4() -> Conv4:
    torch.manual_seed(0)
    model = Conv4(in_channels=1, ways=3, hidden=6, image_size=16)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def _scale(params):
    """A smooth function of the parameters (so a hook or term depending on it has a gradient)."""
    return 1 + 0.2 * torch.tanh(params["head.bias"].sum() + params["features.1.weight"].mean())


def support_hook(params, x, y):
    return x * _scale(params)


def query_hook(params, x, y):
    return x + 0.1 * _scale(params)


def inner_term(params, step):
    return (step + 1) * 0.05 * params["head.weight"].pow(2).sum()


def outer_term(adapted, initial):
    return 0.1 * sum((adapted[n] - initial[n]).pow(2).sum() for n in adapted)


SEAMS = {
    "support_hook": dict(support_hook=support_hook),
    "support_hook_gradients": dict(support_hook=support_hook, hook_gradients=True),
    "query_hook": dict(query_hook=query_hook),
    "query_hook_gradients": dict(query_hook=query_hook, hook_gradients=True),
    "inner_term": dict(inner_term=inner_term),
    "outer_term": dict(outer_term=outer_term),
    "all": dict(support_hook=support_hook, query_hook=query_hook, inner_term=inner_term, outer_term=outer_term,
                hook_gradients=True),
}


def reference(learner, batch, seams, initial=None, steps=2):
    """The per-task loop with plain autograd, the seams written out: the definition."""
    model, lr = learner.model, learner.inner_lr
    hook_grads = seams.get("hook_gradients", False)
    params = dict(model.named_parameters())

    def through(hook, p, x, y):
        if hook is None:
            return x
        return hook(p, x, y) if hook_grads else hook({n: v.detach() for n, v in p.items()}, x, y).detach()

    total = 0.0
    for t in range(len(batch)):
        ep = batch[t]
        start = {**params, **{n: v[t] for n, v in (initial or {}).items()}}
        p = dict(start)
        for step in range(steps):
            x = through(seams.get("support_hook"), p, ep.support_x, ep.support_y)
            inner = F.cross_entropy(functional_call(model, p, (x,)), ep.support_y)
            if "inner_term" in seams:
                inner = inner + seams["inner_term"](p, step)
            grads = torch.autograd.grad(inner, list(p.values()), create_graph=True, allow_unused=True,
                                        materialize_grads=True)
            p = {n: v - lr * g for (n, v), g in zip(p.items(), grads)}
        xq = through(seams.get("query_hook"), p, ep.query_x, ep.query_y)
        outer = F.cross_entropy(functional_call(model, p, (xq,)), ep.query_y)
        if "outer_term" in seams:
            outer = outer + seams["outer_term"](p, start)
        total = total + outer
    return torch.autograd.grad(total / len(batch), [q for q in learner.parameters() if q.requires_grad],
                               allow_unused=True)


def engine(learner, batch, initial=None):
    learner.zero_grad(set_to_none=True)
    learner.meta_loss(batch, initial=initial)[0].backward()
    return [q.grad for q in learner.parameters() if q.requires_grad]


def _learner(execution, **seams):
    return MAML(_conv4(), inner_lr=0.3, inner_steps=2, execution=execution.removesuffix("-checkpointed"),
                checkpoint_inner_loop=execution.endswith("-checkpointed"), **seams)


@pytest.mark.parametrize("execution", PATHS)
@pytest.mark.parametrize("name", sorted(SEAMS))
def test_each_seam_matches_the_reference_on_every_path(name, execution):
    learner = _learner(execution, **SEAMS[name])
    batch = _batch()
    got = engine(learner, batch)
    assert_grads_close(got, reference(learner, batch, SEAMS[name]))
    plain = reference(learner, batch, {})
    assert max(float((g - p).norm()) for g, p in zip(got, plain) if g is not None and p is not None) > 1e-6


@pytest.mark.parametrize("execution", PATHS)
def test_per_task_initial_parameters_match_the_reference_and_reach_what_made_them(execution):
    learner = _learner(execution, outer_term=outer_term)
    batch = _batch()
    spread = torch.tensor(0.3, requires_grad=True)  # a learned distribution's scale, outside the learner
    g = torch.Generator().manual_seed(7)
    noise = {n: torch.randn(TASKS, *p.shape, generator=g) for n, p in learner.model.named_parameters()
             if n.startswith("head")}

    def sample():
        return {n: dict(learner.model.named_parameters())[n] + spread * e for n, e in noise.items()}

    got = engine(learner, batch, initial=sample())
    spread_grad = spread.grad.clone()
    spread.grad = None
    expected = reference(learner, batch, {"outer_term": outer_term}, initial=sample())
    assert_grads_close(got, expected)
    initial = sample()
    loss = reference_loss(learner, batch, initial)
    (expected_spread,) = torch.autograd.grad(loss, spread)
    assert torch.allclose(spread_grad, expected_spread, rtol=1e-9, atol=1e-12) and spread_grad.abs() > 0


def reference_loss(learner, batch, initial, steps=2):
    model, lr = learner.model, learner.inner_lr
    params = dict(model.named_parameters())
    total = 0.0
    for t in range(len(batch)):
        ep = batch[t]
        start = {**params, **{n: v[t] for n, v in initial.items()}}
        p = dict(start)
        for _ in range(steps):
            inner = F.cross_entropy(functional_call(model, p, (ep.support_x,)), ep.support_y)
            grads = torch.autograd.grad(inner, list(p.values()), create_graph=True, allow_unused=True,
                                        materialize_grads=True)
            p = {n: v - lr * g for (n, v), g in zip(p.items(), grads)}
        total = total + F.cross_entropy(functional_call(model, p, (ep.query_x,)), ep.query_y) + outer_term(p, start)
    return total / len(batch)


def test_seams_on_the_vmap_path_when_asked_for():
    torch.manual_seed(1)
    model = MLP(1, [8, 8], 1).double()

    def term(params, step):
        return 0.01 * params["head.weight"].pow(2).sum()

    auto = MAML(model, inner_lr=0.1, inner_steps=2, task="regression", inner_term=term)
    vmapped = MAML(model, inner_lr=0.1, inner_steps=2, task="regression", inner_term=term, execution="vmap")
    g = torch.Generator().manual_seed(3)
    batch = TaskBatch(*(torch.randn(4, 6, 1, generator=g) for _ in range(4)))
    assert auto.plan(batch).path == "per-task" and "not known to be vmap-safe" in str(auto.plan(batch))
    assert vmapped.plan(batch).path == "vmap"
    assert_grads_close(engine(vmapped, batch), engine(auto, batch))


def test_per_task_initial_parameters_run_vmapped_for_a_vmap_safe_model():
    torch.manual_seed(1)
    model = MLP(1, [8, 8], 1).double()
    auto = MAML(model, inner_lr=0.1, inner_steps=2, task="regression")
    per_task = MAML(model, inner_lr=0.1, inner_steps=2, task="regression", execution="per-task")
    g = torch.Generator().manual_seed(3)
    batch = TaskBatch(*(torch.randn(4, 6, 1, generator=g) for _ in range(4)))
    spread = torch.tensor(0.3, requires_grad=True)
    noise = torch.randn(4, *model.head.weight.shape, generator=g)
    assert auto.plan(batch).path == "vmap"
    got = engine(auto, batch, initial={"head.weight": model.head.weight + spread * noise})
    got_spread, spread.grad = spread.grad, None
    expected = engine(per_task, batch, initial={"head.weight": model.head.weight + spread * noise})
    assert_grads_close(got, expected)
    assert torch.allclose(got_spread, spread.grad, rtol=1e-9, atol=1e-12) and spread.grad.abs() > 0


def test_bad_initial_parameters_are_refused():
    learner = MAML(_conv4(), inner_lr=0.3)
    with pytest.raises(ValueError, match=r"initial\['head.bias'\] must have shape \(3, 3\)"):
        learner.meta_loss(_batch(), initial={"head.bias": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="'nope', not a parameter"):
        learner.meta_loss(_batch(), initial={"nope": torch.zeros(3, 3)})
