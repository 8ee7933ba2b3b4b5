"""Any nn.Module works with the learners: running-stat BatchNorm, dropout, and the object API."""

from __future__ import annotations

import torch
from torch import nn

from fastadapt import MAML, MetaSGD, ProtoNet, TaskBatch
from fastadapt.nn import MLP, Conv4


def _batch(tasks=2, ways=3, shots=2, queries=3, shape=(1, 8, 8)) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    return TaskBatch(torch.rand(tasks, ways * shots, *shape, generator=g),
                     torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous(),
                     torch.rand(tasks, ways * queries, *shape, generator=g),
                     torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous())


def test_user_module_with_running_stat_batchnorm_and_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    weights = {k: v.clone() for k, v in model.named_parameters()}
    maml = MAML(model, inner_lr=0.1, inner_steps=2)
    assert maml.plan(_batch()).path == "per-task"
    loss, metrics = maml.meta_loss(_batch())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
    for name, p in model.named_parameters():  # parameters are never written by the learner
        assert torch.equal(p, weights[name])
    model.eval()  # eval mode: running statistics, no dropout: deterministic predictions
    ep = _batch()[0]
    a = maml.adapt(ep.support_x, ep.support_y)(ep.query_x)
    b = maml.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert torch.equal(a, b)


def test_mlp_with_dropout_runs_vmapped_with_independent_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1))
    maml = MetaSGD(model, inner_lr=0.01, task="regression")
    same_task = TaskBatch(*(torch.ones(2, 4, 1) for _ in range(4)))
    assert maml.plan(same_task).path == "vmap"
    loss, _ = maml.meta_loss(same_task)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in maml.parameters())
    outputs = torch.func.vmap(lambda x: model(x), randomness="different")(torch.ones(2, 64, 1))
    assert not torch.equal(outputs[0], outputs[1])


def test_adapted_learner_improves_on_its_own_support_set():
    torch.manual_seed(0)
    maml = MAML(MLP(1, [40, 40], 1), inner_lr=0.01, inner_steps=5, task="regression")
    x = torch.linspace(-5, 5, 10).unsqueeze(1)
    y = 3 * torch.sin(x)
    before = nn.functional.mse_loss(maml.model(x), y)
    after = nn.functional.mse_loss(maml.adapt(x, y)(x), y)
    assert after < before


def test_protonet_adapt_predicts_like_meta_loss():
    torch.manual_seed(0)
    net = ProtoNet(Conv4(in_channels=1, ways=None, hidden=8, image_size=16))
    batch = _batch(shape=(1, 16, 16))
    with torch.no_grad():
        per_task = net.task_metrics(batch)["accuracy"]
        ep = batch[1]
        logits = net.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert logits.shape == (9, 3)
    assert torch.isclose((logits.argmax(-1) == ep.query_y).float().mean(), per_task[1])
