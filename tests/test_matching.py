"""Matching Networks: attention over the support set, FCE, invariances, the task-wise meta-gradient
against a plain autograd reference, and learning on real Omniglot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastadapt import EpisodeSampler, MatchingNet, TaskBatch
from fastadapt.algorithms.matching import FullContextEmbedding, cosine_attention
from fastadapt.nn import Conv4
from fastadapt.training import evaluate_learner, meta_train

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTADAPT_DATA") or ROOT.parent / "shared" / "data")
needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot" / "images_background.zip").is_file(),
                                    reason=f"Omniglot zips not found under {DATA}/omniglot (set FASTADAPT_DATA)")

WAYS, SHOTS, QUERIES = 3, 2, 4
OPTIONS = [{"fce": False}, {"fce": True}, {"fce": True, "similarity": "scaled-cosine"}]


def _net(**options) -> MatchingNet:
    torch.manual_seed(0)
    return MatchingNet(Conv4(in_channels=1, ways=None, hidden=6, image_size=16), fce_steps=3, **options).double()


def _batch(tasks: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    return TaskBatch(torch.rand(tasks, WAYS * SHOTS, 1, 16, 16, generator=g, dtype=torch.float64),
                     torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1).contiguous(),
                     torch.rand(tasks, WAYS * QUERIES, 1, 16, 16, generator=g, dtype=torch.float64),
                     torch.arange(WAYS).repeat_interleave(QUERIES).expand(tasks, -1).contiguous())


@pytest.mark.parametrize("options", OPTIONS)
def test_attention_sums_to_one_over_the_support_set_for_every_query(options):
    ep = _batch(1)[0]
    attention = _net(**options).attention(ep.support_x, ep.query_x)
    assert attention.shape == (WAYS * QUERIES, WAYS * SHOTS) and bool((attention > 0).all())
    assert torch.allclose(attention.sum(-1), torch.ones(WAYS * QUERIES, dtype=torch.float64), atol=1e-12)


def test_the_prediction_is_the_attention_weighted_sum_of_one_hot_labels():
    ep = _batch(1)[0]
    net = _net()
    attention = net.attention(ep.support_x, ep.query_x)
    expected = attention @ F.one_hot(ep.support_y, WAYS).double()
    assert torch.allclose(net.episode_logits(ep.support_x, ep.support_y, ep.query_x).exp(), expected, atol=1e-12)


def test_fce_changes_the_embeddings_and_reads_the_support_set_as_a_set():
    ep = _batch(1)[0]
    plain_g, plain_f = _net().embed(ep.support_x, ep.query_x)
    fce_g, fce_f = _net(fce=True).embed(ep.support_x, ep.query_x)  # same encoder weights (seed 0)
    assert (fce_g - plain_g).abs().max() > 1e-3 and (fce_f - plain_f).abs().max() > 1e-3
    fce = _net(fce=True).fce
    assert fce is not None
    perm = torch.randperm(WAYS * SHOTS, generator=torch.Generator().manual_seed(0))
    # f attends over g with a weighted sum: the same for any order of the support set
    assert torch.allclose(fce.embed_query(plain_f, fce_g[perm]), fce.embed_query(plain_f, fce_g), atol=1e-12)
    # g is a bidirectional LSTM over the sequence: each embedding depends on its context and position
    assert (fce.embed_support(plain_g[perm]) - fce.embed_support(plain_g)[perm]).abs().max() > 1e-6
    # queries are embedded independently of one another
    assert torch.allclose(fce.embed_query(plain_f[:2], fce_g), fce.embed_query(plain_f, fce_g)[:2], atol=1e-12)


def test_without_fce_predictions_do_not_depend_on_the_order_of_the_support_set():
    ep = _batch(1)[0]
    net = _net()
    perm = torch.randperm(WAYS * SHOTS, generator=torch.Generator().manual_seed(0))
    shuffled = net.episode_logits(ep.support_x[perm], ep.support_y[perm], ep.query_x)
    assert torch.allclose(shuffled, net.episode_logits(ep.support_x, ep.support_y, ep.query_x), atol=1e-12)


@pytest.mark.parametrize("options", OPTIONS)
def test_predictions_are_invariant_to_relabelling_the_classes(options):
    ep = _batch(1)[0]
    net = _net(**options)
    relabel = torch.tensor([2, 0, 1])  # class c is called relabel[c]
    logits = net.episode_logits(ep.support_x, ep.support_y, ep.query_x)
    renamed = net.episode_logits(ep.support_x, relabel[ep.support_y], ep.query_x)
    assert torch.allclose(renamed[:, relabel], logits, atol=1e-12)


@pytest.mark.parametrize("options", OPTIONS)
def test_taskwise_meta_gradient_equals_a_plain_autograd_reference_in_float64(options):
    net = _net(**options)
    batch = _batch()
    loss, metrics = net.meta_loss(batch)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    reference = 0.0
    for t in range(len(batch)):  # written out with torch ops, the module called as a module
        z = net.encoder(torch.cat([batch.support_x[t], batch.query_x[t]]))
        g, f = z[:WAYS * SHOTS], z[WAYS * SHOTS:]
        if net.fce is not None:
            g = net.fce.embed_support(g)
            f = net.fce.embed_query(f, g)
        similarity = F.cosine_similarity(f[:, None], g[None], dim=-1, eps=1e-30)
        if options.get("similarity") == "scaled-cosine":
            similarity = similarity * f.norm(dim=-1, keepdim=True)
        probs = similarity.softmax(-1) @ F.one_hot(batch.support_y[t], WAYS).double()
        reference = reference + F.nll_loss(probs.log(), batch.query_y[t]) / len(batch)
    expected = torch.autograd.grad(reference, list(net.parameters()), allow_unused=True, materialize_grads=True)
    assert abs(float(loss.detach()) - float(reference.detach())) < 1e-12
    scale = max(float(e.abs().max()) for e in expected)
    for got, want in zip(grads, expected):  # absolute, in units of the largest gradient entry
        assert float((got - want).abs().max()) <= 1e-9 * scale
    assert set(metrics) == {"loss", "accuracy"}


def test_bad_options_are_refused_with_the_value_and_the_fix():
    with pytest.raises(ValueError, match="fce=True needs the embedding size: pass embedding_dim="):
        MatchingNet(torch.nn.Flatten(), fce=True)
    with pytest.raises(ValueError, match="similarity must be 'cosine' or 'scaled-cosine', got 'dot'"):
        MatchingNet(torch.nn.Flatten(), similarity="dot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps .* must be an integer >= 1, got 0"):
        FullContextEmbedding(8, steps=0)
    assert torch.allclose(cosine_attention(torch.ones(1, 2), torch.eye(2)), torch.full((1, 2), 0.5))


@pytest.fixture()
def one_thread():
    """One thread: bounded time when the two cores are shared (two threads can run 10x slower then)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_omniglot
def test_matchingnet_learns_omniglot_5way_1shot_well_above_chance(one_thread):
    from fastadapt.data.omniglot import omniglot_splits

    splits = omniglot_splits(DATA)  # the decode cache ($FASTADAPT_CACHE or ~/.cache/fastadapt)
    torch.manual_seed(0)
    net = MatchingNet(Conv4.omniglot(ways=None))  # the paper's cosine, no FCE
    meta_train(net, EpisodeSampler(splits["train"], 5, 1, 5, seed=0), iterations=150, meta_batch=1, meta_lr=1e-3)
    result = evaluate_learner(net, EpisodeSampler(splits["test"], 5, 1, 15, seed=0), episodes=100)
    assert result["accuracy"].mean > 0.5, result["accuracy"]  # chance: 0.2


@needs_omniglot
def test_fastadapt_train_matchingnet_recipe_with_fce(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastadapt.cli", "train",
                           str(ROOT / "recipes" / "matchingnet" / "omniglot-5w1s.yaml"), "--set", "iterations=2",
                           "--set", "eval_episodes=2", "--set", "fce=true", "--set", f"data_root={DATA}",
                           "--set", "threads=1", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout and (tmp_path / "r" / "results.json").is_file()
