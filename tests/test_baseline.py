"""Baseline / Baseline++: global-label batches, the cosine head, frozen-backbone fine-tuning, learning, runs."""

from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastadapt import EpisodeSampler, TaskBatch
from fastadapt.algorithms.baseline import Baseline, CosineHead
from fastadapt.data import ClassBatchSampler, ImageClassDataset
from fastadapt.nn import Conv4
from fastadapt.training import evaluate_learner, meta_train
from fastadapt.training.config import Config, ConfigError

DATA = Path(os.environ.get("FASTADAPT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot" / "images_background.zip").is_file(),
                                    reason=f"Omniglot zips not found under {DATA}/omniglot (set FASTADAPT_DATA)")
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _dataset(classes: int = 12, per_class: int = 6) -> ImageClassDataset:
    """Every image's pixels encode its own index, so gathered images identify the examples."""
    n = classes * per_class
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    labels = torch.arange(n).remainder(classes)  # interleaved: labels are not sorted in the dataset
    return ImageClassDataset(images, labels)


def test_pretraining_batches_carry_global_labels_are_class_balanced_and_reproducible():
    ds = _dataset()
    sampler = ClassBatchSampler(ds, classes=4, per_class=3, seed=7)
    batch = sampler.task_batch(5, 3)
    assert batch.support_x.shape == (3, 12, 1, 4, 4) and batch.query_x.shape[1] == 0 and sampler.num_classes == 12
    for t in range(3):
        index = (batch.support_x[t, :, 0, 0, 0] * 255).round().long()  # which examples were gathered
        assert torch.equal(ds.labels[index], batch.support_y[t])  # the dataset's own (global) labels
        counts = torch.bincount(batch.support_y[t], minlength=12)
        assert sorted(counts[counts > 0].tolist()) == [3, 3, 3, 3]  # 4 distinct classes, 3 examples each
        assert index.unique().numel() == 12  # no example twice
    again = ClassBatchSampler(ds, classes=4, per_class=3, seed=7).task_batch(5, 3)
    assert torch.equal(again.support_x, batch.support_x) and torch.equal(again.support_y, batch.support_y)
    other = ClassBatchSampler(ds, classes=4, per_class=3, seed=8).task_batch(5, 3)
    assert not torch.equal(other.support_y, batch.support_y)
    assert torch.equal(sampler.task_batch(6, 1).support_y[0], batch.support_y[1])  # batch i is a function of (seed, i)


def test_pretraining_sampler_refuses_impossible_requests():
    with pytest.raises(ValueError, match="classes=13 exceeds the 12 classes"):
        ClassBatchSampler(_dataset(), classes=13, per_class=1)
    with pytest.raises(ValueError, match="per_class=7 exceeds the 6 examples of class"):
        ClassBatchSampler(_dataset(), classes=2, per_class=7)
    with pytest.raises(ValueError, match="per_class must be a positive integer, got 0"):
        ClassBatchSampler(_dataset(), classes=2, per_class=0)


def test_cosine_head_logits_are_scale_times_cosine():
    torch.manual_seed(0)
    z = torch.randn(5, 8)
    fixed = CosineHead(8, 3, scale=4.0)
    expected = 4.0 * F.cosine_similarity(z[:, None, :], fixed.weight[None, :, :], dim=-1)
    assert torch.allclose(fixed(z), expected, atol=1e-6)
    assert torch.allclose(fixed(3.0 * z), fixed(z), atol=1e-6)  # invariant to the embedding's norm
    assert "scale" not in dict(fixed.named_parameters()) and float(fixed.scale) == 4.0
    assert float(CosineHead(8, 4800).scale) == 10.0 and float(CosineHead(8, 5).scale) == 2.0  # the authors' rule
    learned = CosineHead(8, 3, scale=4.0, learn_scale=True)
    learned(z).sum().backward()
    assert learned.scale.grad is not None and learned.scale.grad != 0


def _episodes(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 4) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    return TaskBatch(torch.rand(tasks, ways * shots, 1, 28, 28, generator=g),
                     torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous(),
                     torch.rand(tasks, ways * queries, 1, 28, 28, generator=g),
                     torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous())


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_fine_tuning_leaves_the_backbone_untouched(head):
    torch.manual_seed(0)
    net = Baseline(Conv4.omniglot(ways=None, track_running_stats=True), 20, head=head, finetune_epochs=5)
    net.meta_loss(TaskBatch(torch.rand(1, 8, 1, 28, 28), torch.arange(8)[None], torch.rand(1, 0, 1, 28, 28),
                            torch.zeros(1, 0, dtype=torch.long)))[0].backward()  # running statistics move away from init
    net.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batch = _episodes()
    net.task_metrics(batch)
    predictor = net.adapt(batch.support_x[0], batch.support_y[0])
    predictor(batch.query_x[0])
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, BatchNorm running statistics, head
    assert all(p.grad is None for p in net.parameters()) and net.training and net.encoder.training


def _chen_reference(z: torch.Tensor, y: torch.Tensor, ways: int, epochs: int, seed: int) -> torch.nn.Linear:
    """The authors' per-episode loop (methods/baselinefinetune.py) with torch.optim, from the same draws."""
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(z.shape[1])
    head = torch.nn.Linear(z.shape[1], ways).double()
    with torch.no_grad():
        head.weight.copy_((torch.rand(ways, z.shape[1], generator=g, dtype=z.dtype) * 2 - 1) * bound)
        head.bias.copy_((torch.rand(ways, generator=g, dtype=z.dtype) * 2 - 1) * bound)
    orders = torch.rand(epochs, len(z), generator=g).argsort(dim=1)
    opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, dampening=0.9, weight_decay=0.001)
    for order in orders:
        for chunk in order.split(4):
            opt.zero_grad()
            F.cross_entropy(head(z[chunk]), y[chunk]).backward()
            opt.step()
    return head


def test_batched_head_fitting_equals_the_authors_loop_with_torch_optim():
    torch.manual_seed(0)
    net = Baseline(Conv4.omniglot(ways=None, track_running_stats=True), 10, finetune_epochs=9).double()
    z = torch.randn(3, 10, 64, dtype=torch.float64)
    y = torch.arange(5).repeat_interleave(2).expand(3, -1)
    weight, bias = net.fit_heads(z, y, 5)
    for t in range(3):
        reference = _chen_reference(z[t], y[t], 5, 9, seed=0)
        assert torch.allclose(weight[t], reference.weight, atol=1e-14) and torch.allclose(bias[t], reference.bias, atol=1e-14)


def test_task_metrics_of_a_batch_equal_adapting_episode_by_episode():
    torch.manual_seed(0)
    net = Baseline(Conv4.omniglot(ways=None, track_running_stats=True), 20, head="cosine", finetune_epochs=5)
    batch = _episodes()
    metrics = net.task_metrics(batch)
    for t in range(len(batch)):
        logits = net.adapt(batch.support_x[t], batch.support_y[t])(batch.query_x[t])
        assert torch.allclose(F.cross_entropy(logits, batch.query_y[t]), metrics["loss"][t], atol=1e-5)
        assert float((logits.argmax(-1) == batch.query_y[t]).float().mean()) == float(metrics["accuracy"][t])


def test_pretraining_refuses_labels_outside_the_global_head():
    net = Baseline(Conv4.omniglot(ways=None, track_running_stats=True), 3)
    with pytest.raises(ValueError, match=r"needs global labels in 0..2, got labels 0..4"):
        net.meta_loss(_episodes(ways=5))


@pytest.mark.parametrize("values, message", [
    ({"dataset": "sinusoid", "backbone": "mlp"}, "algorithm 'baseline' needs a classification dataset"),
    ({"head": "euclid"}, "head must be one of linear, cosine; got 'euclid'"),
    ({"precision": "bf16"}, "precision 'bf16' is not implemented for baseline"),
])
def test_bad_baseline_keys_are_refused(values, message):
    with pytest.raises(ConfigError) as error:
        Config.from_dict({"algorithm": "baseline", "dataset": "omniglot", "backbone": "conv4", **values})
    assert message in str(error.value)
    with pytest.raises(ConfigError, match="head='cosine' applies to algorithm 'baseline', not 'maml'"):
        Config.from_dict({"algorithm": "maml", "head": "cosine"})


@needs_omniglot
def test_baseline_learns_omniglot_well_above_chance():
    """Pre-training on 100 of the meta-training classes for 150 batches of 16, then 5-way 1-shot
    episodes of the meta-test characters, fine-tuned as the authors do."""
    from fastadapt.data.omniglot import omniglot_splits

    splits = omniglot_splits(DATA)
    train = splits["train"]
    keep = train.labels < 100
    subset = ImageClassDataset(train.images[keep], train.labels[keep])
    torch.manual_seed(0)
    net = Baseline(Conv4.omniglot(ways=None, track_running_stats=True), 100)
    history = meta_train(net, ClassBatchSampler(subset, classes=16, per_class=1, seed=0), iterations=150,
                         meta_batch=1, meta_lr=2e-3, log_every=50)
    result = evaluate_learner(net, EpisodeSampler(splits["test"], 5, 1, 5, seed=0), episodes=64)
    print(f"\npre-training accuracy {[round(r['accuracy'], 3) for r in history]}, 5-way 1-shot test {result['accuracy']}")
    assert history[-1]["accuracy"] > history[0]["accuracy"]
    assert result["accuracy"].mean > 0.6  # chance: 0.2


def _logged(run: Path) -> list[tuple[str, ...]]:
    with open(run / "metrics.csv") as f:
        return [(r["step"], r["phase"], r["loss"], r["accuracy"]) for r in csv.DictReader(f)]


@needs_omniglot
def test_recipe_trains_resumes_exactly_and_evaluates_at_other_ways(tmp_path):
    """`fastadapt.train` on the 5w1s recipe: checkpoints hold the BatchNorm running statistics, a
    run resumed from an earlier checkpoint ends exactly like the uninterrupted one, and a trained
    run is evaluated 20-way (a new head per episode)."""
    import fastadapt
    from fastadapt.training.checkpoint import load_checkpoint

    overrides = dict(iterations=30, log_every=10, checkpoint_every=10, validation_every=15, validation_characters=100,
                     validation_episodes=4, eval_episodes=8, data_root=str(DATA))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    results = fastadapt.train(RECIPES / "baseline" / "omniglot-5w1s.yaml", whole, overrides=overrides, progress=False)
    assert results["config"]["algorithm"] == "baseline" and results["steps"] == 30 and 0.2 < results["mean"] <= 1
    tensors, _ = load_checkpoint(whole / "checkpoints" / "step-000000030.json")
    assert any(name.endswith("running_mean") for name in tensors)
    shutil.copytree(whole, resumed)
    for path in [resumed / "results.json", *(resumed / "checkpoints").glob("step-000000030.*")]:
        path.unlink()  # as if killed between step 20 and 30
    again = fastadapt.train(out=resumed, resume=True, progress=False)
    assert {k: again[k] for k in ("mean", "ci95", "metrics", "best_step")} == \
        {k: results[k] for k in ("mean", "ci95", "metrics", "best_step")}
    assert _logged(resumed) == _logged(whole)
    evaluated = fastadapt.evaluate(whole, ways=20, episodes=4)
    assert evaluated["ways"] == 20 and evaluated["inner_steps"] is None and 0 <= evaluated["mean"] <= 1


def test_recipes_cover_the_four_omniglot_settings_with_one_pretraining():
    from fastadapt.training.recipes import load_recipe

    configs = [load_recipe(RECIPES / "baseline" / f"omniglot-{w}w{s}s.yaml") for w, s in ((5, 1), (5, 5), (20, 1), (20, 5))]
    assert [(c.ways, c.shots) for c in configs] == [(5, 1), (5, 5), (20, 1), (20, 5)]
    pretraining = {(c.train_ways, c.train_shots, c.meta_batch, c.meta_lr, c.iterations, c.optimizer) for c in configs}
    assert pretraining == {(16, 1, 1, 1e-3, 30000, "adam")}  # batches of 16, Adam 1e-3, 5 epochs of 96,000 images


@pytest.mark.parametrize("running_statistics", [True, False])
def test_a_task_is_scored_the_same_alone_and_in_a_batch(running_statistics):
    """With batch-statistics BatchNorm each task is embedded on its own, as `adapt` does: no task's
    statistics leak into another's result."""
    torch.manual_seed(0)
    learner = Baseline(Conv4.omniglot(ways=None, track_running_stats=running_statistics), num_classes=10,
                       finetune_epochs=3)
    images = torch.randint(0, 256, (60, 1, 28, 28), dtype=torch.uint8)
    batch = EpisodeSampler(ImageClassDataset(images, torch.arange(60) // 6), 5, 1, 2, seed=0).task_batch(0, 3)
    together = learner.query_outputs(batch)
    for t in range(len(batch)):
        alone = learner.query_outputs(batch.split(1)[t])[0]
        predictor = learner.eval().adapt(batch.support_x[t], batch.support_y[t])
        with torch.no_grad():
            adapted = predictor(batch.query_x[t])
        assert torch.allclose(together[t], alone, atol=1e-5) and torch.allclose(together[t], adapted, atol=1e-5)
