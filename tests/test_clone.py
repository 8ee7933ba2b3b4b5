"""learn2learn's habit on the functional core: `clone = maml.clone(); clone.adapt(loss); clone(x)`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadapt import FOMAML, MAML, MAMLPlusPlus, MetaSGD, ANIL, EpisodeSampler, TaskBatch
from fastadapt.nn import Conv4
from fastadapt.training.evaluate import evaluate_learner
from meta_grad_helpers import assert_grads_close, engine_grads

DATA = Path(os.environ.get("FASTADAPT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def _batch(tasks=3, ways=3, shots=2, queries=4, size=16, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.rand(tasks, ways * shots, 1, size, size, generator=g, dtype=torch.float64),
                     torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous(),
                     torch.rand(tasks, ways * queries, 1, size, size, generator=g, dtype=torch.float64),
                     torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous())


def _conv4() -> Conv4:
    torch.manual_seed(0)
    model = Conv4(in_channels=1, ways=3, hidden=6, image_size=16).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    return model


def clone_meta_grads(learner, batch, steps):
    """The ten-line custom loop of the README, with the learner's own loss."""
    learner.zero_grad(set_to_none=True)
    total = 0.0
    for t in range(len(batch)):
        ep = batch[t]
        clone = learner.clone()
        for _ in range(steps):
            clone.adapt(F.cross_entropy(clone(ep.support_x), ep.support_y))
        total = total + F.cross_entropy(clone(ep.query_x), ep.query_y)
    (total / len(batch)).backward()
    return [p.grad for p in learner.parameters() if p.requires_grad]


LEARNERS = {
    "maml": lambda: MAML(_conv4(), inner_lr=0.3, inner_steps=2),
    "fomaml": lambda: FOMAML(_conv4(), inner_lr=0.3, inner_steps=2),
    "metasgd": lambda: MetaSGD(_conv4(), inner_lr=0.2, inner_steps=2),
    "anil": lambda: ANIL(_conv4(), inner_lr=0.3, inner_steps=2),
    "maml-adam": lambda: MAML(_conv4(), inner_lr=0.01, inner_steps=2, inner_optimizer="adam"),
    "maml++": lambda: MAMLPlusPlus(_conv4(), inner_lr=0.2, inner_steps=2, multi_step_loss_iterations=0),
}


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_the_clone_loop_equals_meta_loss(float64, name):
    learner = LEARNERS[name]()
    batch = _batch()
    assert_grads_close(clone_meta_grads(learner, batch, 2), engine_grads(learner, batch), tol=1e-9)


def test_the_clone_takes_any_loss_and_never_writes_into_the_module(float64):
    learner = MAML(_conv4(), inner_lr=0.3, inner_steps=1)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    ep = _batch()[0]
    clone = learner.clone()
    brier = (1 - F.softmax(clone(ep.support_x), -1).gather(1, ep.support_y[:, None])).pow(2).mean()
    clone.adapt(brier)                                                  # a loss the learner does not know
    adapted = clone(ep.query_x)
    F.cross_entropy(adapted, ep.query_y).backward()
    assert learner.model.head.weight.grad is not None and learner.model.features[0].weight.grad is not None
    assert all(torch.equal(v, before[k]) for k, v in learner.state_dict().items())
    plain = learner.clone()
    assert not torch.allclose(plain(ep.query_x), adapted)               # the clone adapted, the module did not
    with torch.no_grad():
        frozen = plain(ep.support_x)
    with pytest.raises(ValueError, match="no graph"):
        plain.adapt(F.cross_entropy(frozen, ep.support_y))


needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot" / "images_background.zip").is_file(),
                                    reason=f"Omniglot zips not found under {DATA}/omniglot (set FASTADAPT_DATA)")


@pytest.mark.slow
@needs_omniglot
def test_a_clone_loop_trains_maml_on_omniglot_above_85_percent(tmp_path):
    from fastadapt.data.omniglot import omniglot_splits

    splits = omniglot_splits(DATA, cache_dir=tmp_path)
    torch.manual_seed(0)
    maml = MAML(Conv4.omniglot(ways=5), inner_lr=0.4, inner_steps=1)
    tasks = EpisodeSampler(splits["train"], ways=5, shots=1, queries=1, seed=0)
    opt = torch.optim.Adam(maml.parameters(), lr=3e-3)
    for step in range(ITERATIONS):
        batch = tasks.task_batch(step * META_BATCH, META_BATCH)
        opt.zero_grad()
        for t in range(len(batch)):
            ep = batch[t]
            clone = maml.clone()
            clone.adapt(F.cross_entropy(clone(ep.support_x), ep.support_y))
            (F.cross_entropy(clone(ep.query_x), ep.query_y) / len(batch)).backward()
        opt.step()
    # `fastadapt run`'s MAML test protocol: 3 inner steps at test time
    result = evaluate_learner(maml, EpisodeSampler(splits["test"], 5, 1, 15, seed=0), episodes=300, inner_steps=3)
    assert result["accuracy"].mean > 0.85, result["accuracy"]  # measured: 0.907 (chance: 0.20)


ITERATIONS, META_BATCH = 300, 16
