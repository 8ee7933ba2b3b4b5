"""Prototypical Networks: the distance math, and the folded batch against a per-episode reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastadapt import ProtoNet, TaskBatch
from fastadapt.algorithms.protonet import proto_logits, prototypes
from fastadapt.functional.fold import can_fold
from fastadapt.nn import Conv4


def test_logits_are_negative_squared_distances_to_class_means():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    protos = prototypes(z, torch.tensor([0, 0, 1]), 2)
    assert torch.equal(protos, torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    logits = proto_logits(torch.tensor([[1.0, 1.0]]), protos)
    assert torch.equal(logits, torch.tensor([[-1.0, -10.0]]))


def _batch() -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    ways, shots, queries, tasks = 3, 2, 4, 4
    return TaskBatch(torch.rand(tasks, ways * shots, 1, 16, 16, generator=g, dtype=torch.float64),
                     torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous(),
                     torch.rand(tasks, ways * queries, 1, 16, 16, generator=g, dtype=torch.float64),
                     torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous())


def test_folded_meta_batch_equals_per_episode_reference_in_float64():
    torch.manual_seed(0)
    encoder = Conv4(in_channels=1, ways=None, hidden=6, image_size=16).double()
    batch = _batch()
    losses, grads = [], []
    for fold in (True, False):
        loss, _ = ProtoNet(encoder, fold=fold).meta_loss(batch)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(encoder.parameters()), materialize_grads=True))
    reference_loss = 0.0
    for t in range(len(batch)):  # each episode on its own: BatchNorm over that episode only
        z = encoder(torch.cat([batch.support_x[t], batch.query_x[t]]))
        protos = torch.stack([z[:6][batch.support_y[t] == c].mean(0) for c in range(3)])
        distances = ((z[6:, None, :] - protos[None]) ** 2).sum(-1)
        reference_loss = reference_loss + F.cross_entropy(-distances, batch.query_y[t]) / len(batch)
    reference = torch.autograd.grad(reference_loss, list(encoder.parameters()))
    scale = max(float(r.norm()) for r in reference)
    for loss, grad in zip(losses, grads):
        assert abs(float((loss - reference_loss).detach())) < 1e-12
        for f, r in zip(grad, reference):  # absolute, in units of the largest gradient: conv biases
            assert float((f - r).norm()) <= 1e-9 * scale  # before BatchNorm have an exactly zero gradient


def test_running_stat_encoders_cannot_fold_but_still_work():
    encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    assert not can_fold(encoder) and can_fold(Conv4(ways=None))
    with pytest.raises(ValueError, match="fold=True"):
        ProtoNet(encoder, fold=True)
    loss, metrics = ProtoNet(encoder.double()).meta_loss(_batch())
    loss.backward()
    assert torch.isfinite(loss) and 0 <= float(metrics["accuracy"]) <= 1
