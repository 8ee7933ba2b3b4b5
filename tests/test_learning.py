"""Real learning on short budgets: accuracies that only learning reaches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fastadapt import MAML, EpisodeSampler, ProtoNet, SinusoidTasks
from fastadapt.nn import MLP, Conv4
from fastadapt.training import evaluate_learner, meta_train

DATA = Path(os.environ.get("FASTADAPT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot" / "images_background.zip").is_file(),
                                    reason=f"Omniglot zips not found under {DATA}/omniglot (set FASTADAPT_DATA)")


def test_maml_on_sinusoid_cuts_post_adaptation_mse_far_below_pre_adaptation():
    torch.manual_seed(0)
    maml = MAML(MLP(1, [40, 40], 1), inner_lr=0.01, inner_steps=1, task="regression")
    meta_train(maml, SinusoidTasks(10, 10, seed=0), iterations=1500, meta_batch=25, meta_lr=1e-3)
    result = evaluate_learner(maml, SinusoidTasks(10, 50, seed=999), episodes=300)
    before, after = result["loss_before"].mean, result["loss"].mean
    assert after < 0.4 * before, (before, after)
    assert after < 1.5


@needs_omniglot
def test_protonet_on_omniglot_5way_1shot_beats_90_percent(tmp_path):
    from fastadapt.data.omniglot import omniglot_splits

    splits = omniglot_splits(DATA, cache_dir=tmp_path)
    torch.manual_seed(0)
    net = ProtoNet(Conv4.omniglot(ways=None))
    meta_train(net, EpisodeSampler(splits["train"], 20, 1, 5, seed=0), iterations=400, meta_batch=1, meta_lr=1e-3)
    result = evaluate_learner(net, EpisodeSampler(splits["test"], 5, 1, 15, seed=0), episodes=300)
    assert result["accuracy"].mean > 0.90, result["accuracy"]
