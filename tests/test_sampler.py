"""Episode sampling: disjoint support/query, label remapping, determinism, bad specs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastadapt.data import EpisodeSampler, ImageClassDataset, SinusoidTasks


def _dataset(classes=10, per_class=6) -> ImageClassDataset:
    n = classes * per_class
    # every image carries its own index in pixel (0, 0) so the test can trace it back
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 0, 0, 1] = torch.arange(n) // 256
    return ImageClassDataset(images, torch.arange(n) // per_class)


def _indices(x: torch.Tensor) -> list[int]:
    pixels = (x[:, 0, 0, :2] * 255).round().long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def test_support_and_query_are_disjoint_and_labels_remapped():
    ds = _dataset()
    sampler = EpisodeSampler(ds, ways=4, shots=2, queries=3, seed=7)
    for i in range(20):
        ep = sampler.episode(i)
        s, q = _indices(ep.support_x), _indices(ep.query_x)
        assert not set(s) & set(q)
        assert len(set(s)) == 8 and len(set(q)) == 12
        assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        # each episode label maps to one original class, consistently across support and query
        mapping = {}
        for idx, y in zip(s + q, ep.support_y.tolist() + ep.query_y.tolist()):
            assert mapping.setdefault(y, int(ds.labels[idx])) == int(ds.labels[idx])
        assert len(set(mapping.values())) == 4


def test_label_order_is_random_not_sorted():
    ds = _dataset()
    sampler = EpisodeSampler(ds, ways=2, shots=1, queries=1, seed=0)
    ascending = set()
    for i in range(30):  # label 0 goes to the smaller class id about half of the time
        first, second = (int(ds.labels[j]) for j in _indices(sampler.episode(i).support_x))
        ascending.add(first < second)
    assert ascending == {True, False}


def test_same_seed_same_episodes_other_seed_different():
    a = EpisodeSampler(_dataset(), 3, 1, 2, seed=1).task_batch(5, 4)
    b = EpisodeSampler(_dataset(), 3, 1, 2, seed=1).task_batch(5, 4)
    c = EpisodeSampler(_dataset(), 3, 1, 2, seed=2).task_batch(5, 4)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.query_x, c.query_x)
    # an episode is the same whether drawn alone or inside a batch
    assert torch.equal(EpisodeSampler(_dataset(), 3, 1, 2, seed=1).episode(6).query_x, a.query_x[1])


_CHILD = """
import torch
from fastadapt.data import EpisodeSampler, ImageClassDataset, SinusoidTasks
images = torch.arange(60 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(60, 1, 4, 4)
ds = ImageClassDataset(images, torch.arange(60) // 6)
b = EpisodeSampler(ds, 4, 2, 3, seed=11).task_batch(100, 3)
s = SinusoidTasks(5, 5, seed=11).task_batch(100, 3)
print(float(b.support_x.sum() * 7 + b.query_x.sum()), float(s.query_y.sum()))
"""


def eval_episodes_are_identical_across_processes():
    runs = [subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].strip()


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(ways=11, shots=1, queries=1), "ways=11 exceeds the 10 classes"),
        (dict(ways=2, shots=4, queries=3), "4 \\+ 3 = 7 exceeds the 6 examples"),
        (dict(ways=0, shots=1, queries=1), "ways must be a positive integer, got 0"),
        (dict(ways=2, shots=-1, queries=1), "shots must be a positive integer, got -1"),
        (dict(ways=2, shots=1, queries=0), "queries must be a positive integer, got 0"),
        (dict(ways=2, shots=1.5, queries=1), "shots must be a positive integer, got 1.5"),
        (dict(ways=2, shots=1, queries=1, seed=-3), "seed must be a non-negative integer, got -3"),
    ],
)
def test_bad_specs_name_the_numbers(spec, message):
    with pytest.raises(ValueError, match=message):
        EpisodeSampler(_dataset(), **spec)


def test_uneven_class_sizes_are_checked_against_the_smallest():
    ds = ImageClassDataset(torch.zeros(9, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="examples of class 1"):
        EpisodeSampler(ds, ways=2, shots=2, queries=1)


def test_any_sequence_of_pairs_works_as_a_dataset():
    data = [(torch.full((2,), float(i)), i % 3) for i in range(12)]
    ep = EpisodeSampler(data, ways=3, shots=1, queries=2, seed=0).episode(0)
    assert ep.support_x.shape == (3, 2) and ep.query_x.shape == (6, 2)


def test_sinusoid_follows_the_maml_distribution():
    batch = SinusoidTasks(shots=5, queries=20, seed=0).task_batch(0, 500)
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    assert x.min() >= -5 and x.max() <= 5
    amplitude = y.abs().amax(1)
    assert amplitude.max() <= 5.0 and amplitude.min() >= 0.0
    assert 2.0 < amplitude.mean() < 3.0  # E|A| ~ 2.55 (slightly below, sampled maxima)
    # a single task is an exact sinusoid: y / A = sin(x - phi) has values within [-1, 1]
    assert batch.support_x.shape == (500, 5, 1) and batch.query_y.shape == (500, 20, 1)
