"""`functional.task_gradients` on each of its paths (task-batched graph, vmap, per task) equals one
`torch.autograd.grad` per task, and so do the gradients taken through it (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadapt.functional.inner_loop import forward
from fastadapt.functional.planner import vmap_exact
from fastadapt.functional.task_batched import task_batched_forward
from fastadapt.functional.task_gradients import task_gradients
from fastadapt.nn import MLP, Conv4

pytestmark = pytest.mark.usefixtures("float64")


def _conv_case():
    torch.manual_seed(0)
    model = Conv4(in_channels=1, ways=3, hidden=4, image_size=16)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(3, 4, 1, 16, 16, generator=g), torch.randint(0, 3, (3, 4), generator=g), F.cross_entropy


def _mlp_case():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return MLP(1, [8, 8], 1), torch.randn(3, 5, 1, generator=g), torch.randn(3, 5, 1, generator=g), F.mse_loss


def _custom_case():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    # BatchNorm1d: no exact vmap rule to second order, and not a conv chain
    model = nn.Sequential(nn.Linear(1, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Tanh(), nn.Linear(6, 2))
    return model, torch.randn(3, 5, 1, generator=g), torch.randint(0, 2, (3, 5), generator=g), F.cross_entropy


CASES = {"task-batched": _conv_case, "vmap": _mlp_case, "per-task": _custom_case}


def _reference(model, params, x, y, loss_fn):
    rows = []
    for t in range(x.shape[0]):
        loss = loss_fn(forward(model, params, x[t]), y[t])
        rows.append(torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True,
                                        materialize_grads=True))
    return {n: torch.stack([row[i] for row in rows]) for i, n in enumerate(params)}


@pytest.mark.parametrize("path", sorted(CASES))
def test_task_gradients_and_their_gradients_equal_the_per_task_loop(path):
    model, x, y, loss_fn = CASES[path]()
    batched, vmapped = task_batched_forward(model) is not None, vmap_exact(model)
    assert (batched, vmapped) == {"task-batched": (True, False), "vmap": (False, True), "per-task": (False, False)}[path]
    params = dict(model.named_parameters())
    got = task_gradients(model, params, x, y, loss_fn, create_graph=True)
    expected = _reference(model, params, x, y, loss_fn)
    for n in params:
        assert got[n].shape == (x.shape[0], *params[n].shape)
        assert torch.allclose(got[n], expected[n], rtol=1e-9, atol=1e-12), n
    # second order: a function of the per-task gradients, differentiated w.r.t. the parameters
    weights = torch.arange(1.0, x.shape[0] + 1)
    def of(grads):
        return sum((weights.view(-1, *[1] * (g.dim() - 1)) * g.tanh()).sum() for g in grads.values())
    second = torch.autograd.grad(of(got), list(params.values()), allow_unused=True, materialize_grads=True)
    reference = torch.autograd.grad(of(expected), list(params.values()), allow_unused=True, materialize_grads=True)
    for a, b in zip(second, reference):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert max(float(a.abs().max()) for a in second) > 0


def test_without_create_graph_the_gradients_are_constants():
    model, x, y, loss_fn = _mlp_case()
    grads = task_gradients(model, dict(model.named_parameters()), x, y, loss_fn)
    assert not any(g.requires_grad for g in grads.values())


@pytest.mark.parametrize("path", sorted(CASES))
def test_frozen_entries_are_constants_and_every_params_entry_is_differentiated(path):
    model, x, y, loss_fn = CASES[path]()
    named = dict(model.named_parameters())
    frozen_name = next(iter(named))
    frozen = {frozen_name: named[frozen_name].detach()}
    params = {n: p.detach() for n, p in named.items() if n != frozen_name}  # no requires_grad: still differentiated
    got = task_gradients(model, params, x, y, loss_fn, frozen=frozen)
    expected = _reference(model, named, x, y, loss_fn)
    assert sorted(got) == sorted(params)
    for n in params:
        assert torch.allclose(got[n], expected[n], rtol=1e-9, atol=1e-12), n


def test_random_layers_draw_per_task_on_the_vmap_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    x = torch.randn(1, 8, 1).expand(4, 8, 1)
    grads = task_gradients(model, dict(model.named_parameters()), x, torch.zeros(4, 8, 1), F.mse_loss)
    first = grads["0.weight"]
    assert not torch.allclose(first[0], first[1])  # the same task four times, four dropout masks
