"""Train and eval semantics: meta-training runs the module in train mode; evaluation runs it in eval
mode (Dropout off, running statistics read and never updated) and writes nothing into it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastadapt import IMAML, MAML, Baseline, MatchingNet, ProtoNet, Reptile, SinusoidTasks, TaskBatch
from fastadapt.training.evaluate import evaluate_ensemble, evaluate_learner


class ImageTasks:
    """A deterministic source of random 3-way 2-shot image episodes (`training.evaluate` needs only this)."""

    seed = 0

    def task_batch(self, start: int, size: int) -> TaskBatch:
        g = torch.Generator().manual_seed(1000 + start)
        ways, shots, queries = 3, 2, 3
        return TaskBatch(torch.rand(size, ways * shots, 1, 16, 16, generator=g),
                         torch.arange(ways).repeat_interleave(shots).expand(size, -1).contiguous(),
                         torch.rand(size, ways * queries, 1, 16, 16, generator=g),
                         torch.arange(ways).repeat_interleave(queries).expand(size, -1).contiguous())


def _conv_net(head: bool = True) -> nn.Sequential:
    """BatchNorm with running statistics and Dropout: what eval mode changes."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5),
              nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(4 * 8 * 8, 3)) if head else nn.Sequential(*layers)


def _dropout_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1))


class _Embedding(nn.Sequential):
    embedding_dim = 4 * 8 * 8


IMAGE_LEARNERS = {
    "maml": lambda: MAML(_conv_net(), inner_lr=0.1, inner_steps=2),
    "imaml": lambda: IMAML(_conv_net(), inner_lr=0.1, inner_steps=2, cg_steps=2),
    "reptile": lambda: Reptile(_conv_net(), inner_lr=0.01, inner_steps=2, inner_optimizer="sgd"),
    "protonet": lambda: ProtoNet(_conv_net(head=False)),
    "matchingnet": lambda: MatchingNet(_conv_net(head=False)),
    "baseline": lambda: Baseline(_Embedding(*_conv_net(head=False)), num_classes=5, finetune_epochs=2),
}


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(IMAGE_LEARNERS))
def test_evaluation_is_repeatable_and_writes_nothing_into_the_module(name):
    learner = IMAGE_LEARNERS[name]()
    before = _state(learner)
    first = evaluate_learner(learner, ImageTasks(), episodes=6, batch_size=3)
    second = evaluate_learner(learner, ImageTasks(), episodes=6, batch_size=3)
    assert {k: v.mean for k, v in first.items()} == {k: v.mean for k, v in second.items()}
    after = _state(learner)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert all(m.training for m in learner.modules())  # the modes are restored
    ensemble = evaluate_ensemble([learner, learner], ImageTasks(), episodes=6, batch_size=3)
    assert ensemble["accuracy"].mean == first["accuracy"].mean
    assert all(torch.equal(before[k], t) for k, t in _state(learner).items())


@pytest.mark.parametrize("name", ["maml", "imaml", "reptile"])
def test_dropout_is_off_in_evaluation(name):
    learner = {"maml": lambda m: MAML(m, 0.01, 2, task="regression"),
               "imaml": lambda m: IMAML(m, 0.01, 2, cg_steps=2, task="regression"),
               "reptile": lambda m: Reptile(m, 0.01, 2, inner_optimizer="sgd", task="regression")}[name](_dropout_mlp())
    batch = SinusoidTasks(seed=3).task_batch(0, 4)
    assert torch.equal(learner.query_outputs(batch), learner.query_outputs(batch))
    first = evaluate_learner(learner, SinusoidTasks(seed=3), episodes=8)
    assert first["loss"].mean == evaluate_learner(learner, SinusoidTasks(seed=3), episodes=8)["loss"].mean
    with torch.no_grad():  # in train mode Dropout is on: two calls differ
        x = batch.query_x[0]
        assert not torch.equal(learner.model(x), learner.model(x))


def test_meta_training_runs_the_module_in_train_mode():
    learner = MAML(_conv_net(), inner_lr=0.1, inner_steps=1)
    norm = learner.model[1]
    before = norm.running_mean.clone()
    learner.meta_loss(ImageTasks().task_batch(0, 2))[0].backward()
    assert not torch.equal(norm.running_mean, before)  # train mode: BatchNorm updates its statistics


def test_predictors_follow_the_mode_they_were_made_in():
    learner = MAML(_conv_net(), inner_lr=0.1, inner_steps=1)
    episode = ImageTasks().task_batch(0, 1)[0]
    norm = learner.model[1]
    with torch.no_grad():
        learner.eval()
        predictor = learner.adapt(episode.support_x, episode.support_y)
        learner.train()
        statistics = norm.running_mean.clone()
        assert torch.equal(predictor(episode.query_x), predictor(episode.query_x))  # eval mode: no Dropout
        assert torch.equal(norm.running_mean, statistics) and learner.model.training
    assert isinstance(predictor, nn.Module)
    proto = ProtoNet(_conv_net(head=False)).eval()
    assert isinstance(proto.adapt(episode.support_x, episode.support_y), nn.Module)
