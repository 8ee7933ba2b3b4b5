"""Attacks on functional models (fastadapt.robust): the ball and the input range hold, PGD finds at
least FGSM's loss, epsilon 0 is the clean evaluation exactly, the same seed gives the same
perturbation, torchattacks agrees where it applies, and every learner is attacked after adaptation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fastadapt.algorithms.baseline import Baseline
from fastadapt.data import EpisodeSampler, ImageClassDataset
from fastadapt.nn import Conv4
from fastadapt.robust import Attack, attack_generator, fgsm, pgd
from fastadapt.robust.attacks import default_loss
from fastadapt.training.config import Config
from fastadapt.training.evaluate import evaluate_learner, evaluate_under_attack
from fastadapt.training.experiment import build_learner

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(os.environ.get("FASTADAPT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot" / "images_background.zip").is_file(),
                                    reason=f"Omniglot zips not found under {DATA}/omniglot (set FASTADAPT_DATA)")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 14 * 14, 5))


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=generator), torch.randint(0, 5, (n,), generator=generator)


def _bands(classes: int = 20, per_class: int = 10) -> ImageClassDataset:
    """Grey 28x28 images, each class a bright band (rows, then columns) over noise: easy to tell
    apart for an untrained network with a few inner steps, and easy to attack."""
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(classes * per_class, 1, 28, 28, generator=generator) * 0.3
    labels = torch.arange(classes).repeat_interleave(per_class)
    for i, c in enumerate(labels.tolist()):
        band = slice(2 * (c % 10) + 4, 2 * (c % 10) + 7)
        if c < 10:
            images[i, 0, band, :] += 0.6
        else:
            images[i, 0, :, band] += 0.6
    return ImageClassDataset((images * 255).to(torch.uint8), labels)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_stays_in_the_ball_and_the_input_range(norm, random_start):
    x, y = _data()
    eps = 0.05 if norm == "linf" else 1.5
    attacked = pgd(eps, norm=norm, steps=7, random_start=random_start)(_net(), x, y,
                                                                     generator=torch.Generator().manual_seed(0))
    delta = (attacked - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-6)).all() and size.max() > 0.5 * eps
    assert attacked.min() >= 0 and attacked.max() <= 1
    assert not attacked.requires_grad


def test_a_stack_of_tasks_gets_an_l2_ball_per_example():
    x, y = _data(40)
    net = _net()
    stacked = pgd(1.0, norm="l2", steps=3)(lambda z: net(z.flatten(0, 1)).unflatten(0, (4, 10)), x.view(4, 10, 1, 28, 28),
                                           y.view(4, 10), batch_dims=2, generator=torch.Generator().manual_seed(0))
    assert ((stacked - x.view(4, 10, 1, 28, 28)).flatten(2).norm(dim=2) <= 1.0 + 1e-6).all()
    with pytest.raises(ValueError, match="batch_dims must be >= 1"):
        pgd(1.0)(net, x, y, batch_dims=4)


def test_pgd_loss_is_at_least_fgsm_loss_and_the_clean_loss():
    x, y = _data(200)
    net = _net()
    with torch.no_grad():
        clean = default_loss(net(x), y)
        one_step = default_loss(net(fgsm(0.03)(net, x, y)), y)
        many_steps = default_loss(net(pgd(0.03, steps=20, random_start=False)(net, x, y)), y)
    assert many_steps >= one_step >= clean
    assert many_steps > clean * 1.05  # a real attack, not a rounding


def test_epsilon_zero_returns_the_inputs_and_targeted_attacks_move_towards_the_target():
    x, y = _data()
    net = _net()
    assert torch.equal(pgd(0.0)(net, x, y), x) and torch.equal(fgsm(0.0)(net, x, y), x)
    with pytest.raises(ValueError, match=r"inputs lie in .*, outside the attack's bounds \(0.0, 1.0\)"):
        pgd(0.1)(net, x * 3 - 1, y)
    assert (pgd(0.1, bounds=None)(net, x * 3 - 1, y) - (x * 3 - 1)).abs().max() <= 0.1 + 1e-6
    target = (y + 1) % 5
    with torch.no_grad():
        before = default_loss(net(x), target)
        after = default_loss(net(pgd(0.1, steps=10, targeted=True)(net, x, target)), target)
    assert after < before


def test_the_same_seed_gives_the_same_perturbation():
    x, y = _data()
    net = _net()
    attack = pgd(0.1, norm="l2", steps=2)
    first = attack(net, x, y, generator=attack_generator(0, 7))
    assert torch.equal(first, attack(net, x, y, generator=attack_generator(0, 7)))
    assert not torch.equal(first, attack(net, x, y, generator=attack_generator(0, 8)))
    assert not torch.equal(first, attack(net, x, y, generator=attack_generator(1, 7)))


def test_bad_attack_settings_name_the_value():
    for kwargs, message in (({"eps": -0.1}, "eps must be a finite number >= 0, got -0.1"),
                            ({"eps": 0.1, "norm": "l1"}, "norm must be 'linf' or 'l2', got 'l1'"),
                            ({"eps": 0.1, "steps": 0}, "steps must be an integer >= 1, got 0"),
                            ({"eps": 0.1, "step_size": 0.0}, "step_size must be a finite number > 0"),
                            ({"eps": 0.1, "bounds": (1.0, 0.0)}, "bounds must be (low, high) with low < high")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Attack(**kwargs)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_equals_torchattacks_without_random_start(norm):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = _data(16)
    net = _net().double()
    x = x.double()
    eps, alpha, steps = (8 / 255, 2 / 255, 10) if norm == "linf" else (1.0, 0.2, 10)
    theirs = (torchattacks.PGD(net, eps=eps, alpha=alpha, steps=steps, random_start=False) if norm == "linf"
              else torchattacks.PGDL2(net, eps=eps, alpha=alpha, steps=steps, random_start=False))(x, y)
    ours = pgd(eps, norm=norm, steps=steps, step_size=alpha, random_start=False)(net, x, y)
    assert (ours - theirs).abs().max() <= 1e-6
    assert (ours - x).abs().max() > 0.5 * (eps if norm == "linf" else alpha)


ALGORITHMS = ["maml", "fomaml", "metasgd", "anil", "maml++", "imaml", "reptile", "protonet", "matchingnet", "baseline"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_learner_is_attacked_after_adaptation(algorithm):
    values = {"algorithm": algorithm, "dataset": "omniglot", "backbone": "conv4", "ways": 5, "shots": 1,
              "inner_lr": 0.4, "inner_steps": 2}
    if algorithm == "imaml":
        values["inner_lr"] = 0.1
    if algorithm == "reptile":
        values.update(inner_optimizer="sgd", inner_lr=0.2)
    learner = build_learner(Config.from_dict(values))
    if algorithm == "baseline":  # an untrained backbone's running statistics say nothing: batch statistics instead
        torch.manual_seed(0)
        learner = Baseline(Conv4.omniglot(ways=None, track_running_stats=False), num_classes=20, finetune_lr=0.1)
    tasks = EpisodeSampler(_bands(), ways=5, shots=1, queries=3, seed=0)
    clean = evaluate_learner(learner, tasks, episodes=6, batch_size=3)
    same = evaluate_under_attack(learner, tasks, pgd(0.0), episodes=6, batch_size=3)
    attacked = evaluate_under_attack(learner, tasks, pgd(0.25, steps=5), episodes=6, batch_size=3)
    assert same["accuracy"].mean == pytest.approx(clean["accuracy"].mean, abs=1e-9)
    assert same["loss"].mean == pytest.approx(clean["loss"].mean, rel=1e-4)
    assert attacked["loss"].mean > clean["loss"].mean + 0.1
    assert attacked["accuracy"].mean < clean["accuracy"].mean - 0.1, (clean, attacked)
    again = evaluate_under_attack(learner, tasks, pgd(0.25, steps=5), episodes=6, batch_size=2)
    assert again["accuracy"].mean == attacked["accuracy"].mean and again["loss"].mean == attacked["loss"].mean
    clean = evaluate_learner(learner, tasks, episodes=3, batch_size=3)
    attacked = evaluate_under_attack(learner, tasks, pgd(0.25, steps=5), episodes=3, batch_size=3)
    for target in ("support", "both"):  # poisoning differentiates through every learner's adaptation
        same = evaluate_under_attack(learner, tasks, pgd(0.0), episodes=3, batch_size=3, target=target)
        assert same["accuracy"].mean == pytest.approx(clean["accuracy"].mean, abs=1e-9)
        poisoned = evaluate_under_attack(learner, tasks, pgd(0.25, steps=5), episodes=3, batch_size=3, target=target)
        assert poisoned["loss"].mean > clean["loss"].mean + 0.2, (target, clean, poisoned)
        if target == "both":
            assert poisoned["loss"].mean > attacked["loss"].mean, (attacked, poisoned)


@needs_omniglot
def test_support_poisoning_hurts_more_than_random_noise_of_the_same_norm(tmp_path):
    """Short Omniglot budgets: a perturbation of the support set found through adaptation costs far
    more clean-query accuracy than random signs of the same L-inf norm, for MAML and ProtoNet."""
    from fastadapt import MAML, ProtoNet
    from fastadapt.data.episodes import TaskBatch
    from fastadapt.data.omniglot import omniglot_splits
    from fastadapt.training import meta_train
    from fastadapt.training.evaluate import estimate_over_episodes

    splits = omniglot_splits(DATA, cache_dir=tmp_path)
    torch.manual_seed(0)
    protonet = ProtoNet(Conv4.omniglot(ways=None))
    meta_train(protonet, EpisodeSampler(splits["train"], 20, 1, 5, seed=0), iterations=200, meta_batch=1, meta_lr=1e-3)
    torch.manual_seed(0)
    maml = MAML(Conv4.omniglot(ways=5), 0.4)
    meta_train(maml, EpisodeSampler(splits["train"], 5, 1, 1, seed=0), iterations=60, meta_batch=8, meta_lr=3e-3)
    test, eps, episodes = EpisodeSampler(splits["test"], 5, 1, 5, seed=0), 0.1, 30
    for learner in (protonet, maml):
        def random_signs(batch: TaskBatch, start: int, learner=learner) -> dict[str, torch.Tensor]:
            signs = torch.randint(0, 2, batch.support_x.shape, generator=torch.Generator().manual_seed(start)) * 2 - 1
            noisy = TaskBatch((batch.support_x + eps * signs).clamp(0, 1), batch.support_y, batch.query_x, batch.query_y)
            return learner.task_metrics(noisy)

        clean = evaluate_learner(learner, test, episodes)["accuracy"].mean
        noise = estimate_over_episodes(random_signs, test, episodes, 32, [learner])["accuracy"].mean
        poisoned = evaluate_under_attack(learner, test, pgd(eps, steps=10), episodes, target="support")["accuracy"].mean
        assert clean > 0.6 and noise > clean - 0.05, (type(learner).__name__, clean, noise)
        assert poisoned < noise - 0.2, (type(learner).__name__, clean, noise, poisoned)


def test_the_robustness_command_writes_every_condition_and_the_clean_number(tmp_path, capsys):
    import json

    import fastadapt
    from fastadapt.cli import main
    from fastadapt.data import DatasetInfo, register_dataset

    bands = _bands()
    register_dataset(DatasetInfo("bands", "20 classes of bands", lambda argument, options: {"train": bands, "test": bands},
                                 lambda argument, options: (1, 28, 28)))
    run = tmp_path / "run"
    fastadapt.train({"algorithm": "protonet", "dataset": "bands", "backbone": "conv4", "ways": 5, "shots": 1,
                     "queries": 2, "eval_queries": 3, "meta_batch": 1, "iterations": 5, "eval_episodes": 4, "threads": 1},
                    run, progress=False)
    command = ["robustness", str(run), "--eps", "0.2", "0.05", "--steps", "3", "--episodes", "6", "--target", "query", "support",
               "--corruption", "rotation:2", "contrast:all", "--corrupt", "query", "--shots", "5",
               "--label-noise", "pair:0.4", "outlier:0.2"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    for label in ("clean", "attack eps 0.05 on query (pgd linf)", "attack eps 0.2 on support", "rotation 2 (query)",
                  "contrast 5 (query)", "label noise pair 0.4", "label noise outlier 0.2"):
        assert label in printed, printed
    files = list((run / "robustness").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("bands-5w5s-6ep-")
    result = json.loads(files[0].read_text())
    conditions = result["conditions"]
    assert [c["condition"] for c in conditions] == ["clean", *["attack"] * 4, "label_noise", "label_noise",
                                                    *["corruption"] * 6]
    assert [(c.get("eps"), c.get("target")) for c in conditions[:5]] == [
        (None, None), (0.05, "query"), (0.2, "query"), (0.05, "support"), (0.2, "support")]
    accuracy = [c["metrics"]["accuracy"]["mean"] for c in conditions]
    assert accuracy[0] == pytest.approx(fastadapt.evaluate(run, episodes=6, shots=5)["mean"], abs=1e-9)
    assert accuracy[2] < accuracy[0] and accuracy[4] < accuracy[0]
    assert main(command) == 0 and json.loads(files[0].read_text()) == result  # the same numbers again
    median = fastadapt.robust.evaluate(run, episodes=6, shots=5, label_noise=[("pair", 0.4)], aggregation="median")
    assert median["aggregation"] == "median" and len(list((run / "robustness").glob("*.json"))) == 2
    from fastadapt.training.config import ConfigError

    for bad, message in (({"corruptions": [("fog", 2)]}, "corruption fog:2: unknown corruption 'fog'"),
                         ({"attack": pgd(0.0), "eps": [float("nan")]}, "eps must be finite numbers >= 0, got nan"),
                         ({"label_noise": [("pair", 0.3)], "shots": 5}, "label noise pair:0.3: rate 0.3 is not a whole"),
                         ({"attack": pgd(0.0), "eps": [0.1], "targets": ["middle"]},
                          r"targets must be some of query, support, both, got \['middle'\]")):
        with pytest.raises(ConfigError, match=message):  # before any episode is evaluated
            fastadapt.robust.evaluate(run, episodes=2, **bad)
    assert len(list((run / "robustness").glob("*.json"))) == 2
    from fastadapt.cli import _radius

    assert _radius("8/255") == 8 / 255 and _radius("0.5") == 0.5
    with pytest.raises(SystemExit):
        main(["robustness", str(run), "--eps", "8/0"])
    assert "expected a number >= 0, got '8/0'" in capsys.readouterr().err
    for bad, message in ((["--attack", "fgsm", "--steps", "3", "--eps", "0.1"], "--attack fgsm is one L-inf step"),
                         (["--label-noise", "all"], "1-shot support sets allow no label noise"),
                         (["--label-noise", "swap:0.2", "--shots", "5"], "the kind must be one of symmetric, pair"),
                         (["--corruption", "fog:2"], "unknown corruption 'fog'"),
                         (["--corruption", "contrast:9"], "a severity 1-5"),
                         ([], "robustness needs a condition")):
        assert main(["robustness", str(run), *bad]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(__import__("fastadapt.robust", fromlist=["CORRUPTIONS"]).CORRUPTIONS))
def test_each_corruption_keeps_shape_and_range_grows_with_severity_and_repeats(name):
    from fastadapt.robust import corrupt

    x = _bands().gather(torch.arange(0, 200, 10))  # 20 images in [0, 1]
    change = []
    for severity in (1, 2, 3, 4, 5):
        y = corrupt(x, name, severity, torch.Generator().manual_seed(severity))
        assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= 0 and y.max() <= 1
        assert torch.equal(y, corrupt(x, name, severity, torch.Generator().manual_seed(severity)))
        change.append(float((y - x).abs().mean()))
    assert change[0] > 0 and change[-1] > change[0], change
    assert sum(b >= a * 0.95 for a, b in zip(change, change[1:])) >= 3, change  # mostly monotone (random draws)


def test_corruption_reaches_support_query_or_both_and_each_episode_alike_in_any_batch():
    from fastadapt.robust import corrupt, corrupted_batch

    batch = EpisodeSampler(_bands(), ways=5, shots=1, queries=2, seed=0).task_batch(0, 4)
    for where, support_changed, query_changed in (("support", True, False), ("query", False, True), ("both", True, True)):
        shifted = corrupted_batch(batch, "elastic", 3, where, seed=0, first_index=10)
        assert (not torch.equal(shifted.support_x, batch.support_x)) == support_changed
        assert (not torch.equal(shifted.query_x, batch.query_x)) == query_changed
    whole = corrupted_batch(batch, "gaussian_noise", 2, "both", seed=0, first_index=10)
    later = corrupted_batch(batch.split(2)[1], "gaussian_noise", 2, "both", seed=0, first_index=12)
    assert torch.equal(whole.query_x[2:], later.query_x) and torch.equal(whole.support_x[2:], later.support_x)
    for bad, message in ((("blur", 1), "unknown corruption 'blur'; known: brightness"), (("contrast", 6), "severity must be")):
        with pytest.raises(ValueError, match=message):
            corrupt(batch.query_x, *bad, torch.Generator())
    with pytest.raises(ValueError, match="where must be one of support, query, both"):
        corrupted_batch(batch, "contrast", 1, "all", seed=0, first_index=0)


def test_a_protonet_loses_accuracy_as_severity_grows():
    from fastadapt.nn import Conv4
    from fastadapt import ProtoNet
    from fastadapt.training.evaluate import evaluate_corrupted

    torch.manual_seed(0)
    learner = ProtoNet(Conv4.omniglot(ways=None))
    tasks = EpisodeSampler(_bands(), ways=5, shots=1, queries=3, seed=0)
    clean = evaluate_learner(learner, tasks, episodes=8, batch_size=4)["accuracy"].mean
    severe = evaluate_corrupted(learner, tasks, "gaussian_noise", 5, "query", episodes=8, batch_size=4)["accuracy"].mean
    assert clean - severe > 0.2, (clean, severe)


@pytest.mark.parametrize("kind, shots, rate, noisy", [
    *[(kind, *case) for kind in ("symmetric", "pair", "outlier") for case in ((5, 0.4, 2), (5, 0.2, 1), (7, 2 / 7, 2))],
    ("symmetric", 5, 0.6, 3), ("outlier", 5, 0.6, 3), ("symmetric", 8, 5 / 8, 5)])
def test_label_noise_keeps_the_rate_and_the_true_class_a_plurality(kind, shots, rate, noisy):
    from fastadapt.robust.label_noise import NoisyLabels

    data = _bands()
    clean_source = EpisodeSampler(data, ways=5, shots=shots, queries=2, seed=3)
    source = NoisyLabels(clean_source, kind, rate)
    assert source.noisy_per_class == noisy
    batch, clean = source.task_batch(0, 4), clean_source.task_batch(0, 4)
    assert torch.equal(batch.query_x, clean.query_x) and torch.equal(batch.query_y, clean.query_y)
    labels = data.labels
    for t in range(4):
        true = _true_classes(clean.support_x[t], clean.support_y[t], batch.support_x[t], data)
        for c in range(5):
            sources = true[batch.support_y[t] == c]  # the true class behind each example labelled c
            own = (sources == int(labels[_class_of(clean, t, c, data)])).sum()
            assert len(sources) == shots and own == shots - noisy
            others = torch.unique(sources[sources != int(labels[_class_of(clean, t, c, data)])], return_counts=True)[1]
            assert len(others) == 0 or others.max() < own  # a plurality
    again = NoisyLabels(clean_source, kind, rate).task_batch(2, 2)
    assert torch.equal(again.support_x, batch.support_x[2:]) and torch.equal(again.support_y, batch.support_y[2:])


def _class_of(clean, t, c, data):
    """A dataset index of the class that label c stands for in clean episode t."""
    return _index_of(clean.support_x[t][clean.support_y[t] == c][0], data)


def _index_of(image, data):
    return int(((data.gather(torch.arange(len(data.labels))) - image).abs().flatten(1).sum(1) == 0).nonzero()[0])


def _true_classes(clean_x, clean_y, noisy_x, data):
    """The dataset class of each noisy support image."""
    return torch.tensor([int(data.labels[_index_of(image, data)]) for image in noisy_x])


def test_noise_that_would_lose_the_plurality_is_refused():
    from fastadapt.robust.label_noise import NoisyLabels

    with pytest.raises(ValueError, match="rate 1.0 makes 1 of 1 shots noisy: with pair noise the true class would "
                                         "not keep a plurality"):
        NoisyLabels(EpisodeSampler(_bands(), 5, 1, 1), "pair", 1.0)
    with pytest.raises(ValueError, match="rate 0.5 makes 2 of 4 shots noisy"):
        NoisyLabels(EpisodeSampler(_bands(), 5, 4, 1), "pair", 0.5)
    with pytest.raises(ValueError, match=r"rate 0.6 makes 3 of 5 shots noisy: with pair noise .*\(2 of its own against "
                                         r"up to 3 from another source\); pair rates that keep it: 0.2, 0.4$"):
        NoisyLabels(EpisodeSampler(_bands(), 5, 5, 1), "pair", 0.6)
    with pytest.raises(ValueError, match=r"symmetric rates that keep it: 0.2, 0.4, 0.6$"):
        NoisyLabels(EpisodeSampler(_bands(), 5, 5, 1), "symmetric", 0.8)
    for rate in (0.05, 0.3, 0.5):
        with pytest.raises(ValueError, match=rf"rate {rate} is not a whole number of the 5 shots .*: 0.2, 0.4$"):
            NoisyLabels(EpisodeSampler(_bands(), 5, 5, 1), "pair", rate)
    with pytest.raises(ValueError, match="outlier noise at 0.4 needs 10 classes outside a 5-way episode, one per "
                                         "outlier; the dataset has 5"):
        NoisyLabels(EpisodeSampler(_bands(classes=10), 5, 5, 1), "outlier", 0.4)
    assert NoisyLabels(EpisodeSampler(_bands(), 5, 5, 1), "pair", 0.0).task_batch(0, 1).support_y.tolist() == \
        EpisodeSampler(_bands(), 5, 5, 1).task_batch(0, 1).support_y.tolist()
    with pytest.raises(ValueError, match="label-noise kind must be one of symmetric, pair, outlier, got 'flip'"):
        NoisyLabels(EpisodeSampler(_bands(), 5, 5, 1), "flip", 0.2)


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean", "weighted"])
def test_robust_prototypes_equal_the_mean_with_one_shot_and_resist_an_outlier(aggregation):
    from fastadapt.algorithms.protonet import prototypes

    z, y = torch.randn(5, 8, dtype=torch.float64), torch.arange(5)
    assert torch.allclose(prototypes(z, y, 5, aggregation), prototypes(z, y, 5, "mean"))
    members = torch.randn(5, 4, dtype=torch.float64) * 0.1
    outlier = torch.cat([members, torch.full((1, 4), 50.0, dtype=torch.float64)])
    labels = torch.zeros(6, dtype=torch.long)
    robust = prototypes(outlier, labels, 1, aggregation)[0]
    assert (robust - members.mean(0)).norm() < 0.5 < (prototypes(outlier, labels, 1, "mean")[0] - members.mean(0)).norm()


def test_the_report_draws_and_tabulates_robustness_results(tmp_path):
    pytest.importorskip("matplotlib")
    import json

    from fastadapt.training.report import write_report

    run = tmp_path / "run"
    (run / "robustness").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"algorithm": "maml", "dataset": "omniglot", "ways": 5, "shots": 5}))

    def row(condition, mean, **keys):
        return {"condition": condition, **keys, "metrics": {"accuracy": {"mean": mean, "ci95": 0.01}}}

    (run / "robustness" / "a.json").write_text(json.dumps({
        "dataset": "omniglot", "ways": 5, "shots": 5, "episodes": 100, "attack": {"kind": "pgd", "norm": "linf"},
        "conditions": [row("clean", 0.9), row("attack", 0.5, eps=0.1), row("attack", 0.2, eps=0.2),
                       row("label_noise", 0.8, kind="pair", rate=0.4),
                       row("corruption", 0.7, name="rotation", severity=3, where="query")]}))
    files = write_report([run], tmp_path / "report")
    assert files.robustness is not None and files.robustness.stat().st_size > 10_000
    text = files.markdown.read_text()
    for line in ("| run | omniglot | 5 | 5 | 100 | attack eps 0.2 on query | 20.00 +- 1.00 |",
                 "| label noise pair 0.4 | 80.00 +- 1.00 |", "| rotation 3 (query) | 70.00 +- 1.00 |",
                 "![robustness](robustness.png)"):
        assert line in text, text
    (run / "robustness" / "a.json").write_text(json.dumps({"conditions": [{"condition": "fog"}]}))
    with pytest.raises(ValueError, match="a.json: a condition needs 'condition'"):
        write_report([run], tmp_path / "report2")
    assert not (tmp_path / "report2").exists()
