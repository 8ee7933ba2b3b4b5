"""Robust meta-training (fastadapt.robust.RobustTraining): the robust outer loss and its meta-gradient
equal a per-task reference written here, in float64, on every execution path; evaluation stays
clean; recipes configure it, bad settings are refused by name; runs repeat and resume exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
import pytest

from fastadapt import MAML, MatchingNet, ProtoNet
from fastadapt.data import EpisodeSampler
from fastadapt.data.episodes import TaskBatch
from fastadapt.functional import forward
from fastadapt.nn import Conv4
from fastadapt.robust import RobustTraining, fgsm, pgd
from fastadapt.training.config import Config, ConfigError
from fastadapt.training.evaluate import evaluate_under_attack
from fastadapt.training.experiment import build_learner

from resume_helpers import assert_repeats_and_resumes_exactly
from test_robust import _bands

pytestmark = pytest.mark.usefixtures("one_thread")

METHOD_ATTACKS = [("aq", fgsm(0.1, random_start=True)), ("adml", fgsm(0.1, random_start=True)),
                  ("trades", pgd(0.1, steps=2))]


def _batch(tasks: int = 3, shots: int = 1, queries: int = 2) -> TaskBatch:
    batch = EpisodeSampler(_bands(), ways=5, shots=shots, queries=queries, seed=0).task_batch(0, tasks)
    return TaskBatch(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Conv4(1, 5, hidden=6).double()


def _reference(model: nn.Module, robust: RobustTraining, batch: TaskBatch, lr: float, steps: int) -> torch.Tensor:
    """The robust outer loss, task by task, written out: ADML attacks the support set against each
    inner step's parameters, AQ / ADML the queries against the adapted ones; TRADES adds beta KL."""
    theta = dict(model.named_parameters())
    losses = []
    for t in range(len(batch)):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        params = dict(theta)
        for _ in range(steps):
            x = sx
            if robust.method == "adml":
                fixed = {n: p.detach() for n, p in params.items()}
                x = robust.attack(lambda z: forward(model, fixed, z), sx, sy, generator=robust.generator(sx))
            loss = F.cross_entropy(forward(model, params, x), sy)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, materialize_grads=True)
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        fixed = {n: p.detach() for n, p in params.items()}
        if robust.method == "trades":
            clean = forward(model, params, qx)
            target = F.softmax(clean.detach(), -1)
            adversarial = robust.attack.perturb(
                lambda z: F.kl_div(F.log_softmax(forward(model, fixed, z), -1), target, reduction="batchmean"), qx,
                generator=robust.generator(qx))
            kl = F.kl_div(F.log_softmax(forward(model, params, adversarial), -1), F.softmax(clean, -1),
                          reduction="batchmean")
            losses.append(F.cross_entropy(clean, qy) + robust.beta * kl)
        else:
            attacked = robust.attack(lambda z: forward(model, fixed, z), qx, qy, generator=robust.generator(qx))
            losses.append(F.cross_entropy(forward(model, params, attacked), qy))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("method, attack", METHOD_ATTACKS)
def test_the_robust_maml_loss_and_meta_gradient_equal_the_reference_on_every_path(float64, method, attack):
    batch, robust = _batch(), RobustTraining(method, attack, beta=2.0, seed=3)
    model = _model()
    expected = _reference(model, robust, batch, lr=0.3, steps=2)
    wanted = torch.autograd.grad(expected, list(model.parameters()), materialize_grads=True)
    for execution, checkpoint in (("loop", False), ("loop", True), ("per-task", False), ("graph", False)):
        model.zero_grad()
        maml = MAML(model, 0.3, inner_steps=2, execution=execution, checkpoint_inner_loop=checkpoint,
                    **robust.seams(model))
        loss, _ = maml.meta_loss(batch)
        loss.backward()
        assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-10), (execution, checkpoint)
        for (name, p), g in zip(model.named_parameters(), wanted):
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            assert torch.allclose(got, g, rtol=1e-8, atol=1e-11), (execution, checkpoint, name)


@pytest.mark.parametrize("learner_class, method", [(ProtoNet, "aq"), (ProtoNet, "trades"), (MatchingNet, "aq"),
                                                   (MatchingNet, "trades")])
def test_metric_learners_train_on_the_attacked_episode_loss(float64, learner_class, method):
    batch, robust = _batch(tasks=2, queries=3), RobustTraining(method, pgd(0.1, steps=2), beta=1.5)
    torch.manual_seed(0)
    learner = learner_class(Conv4(1, None, hidden=6).double(), robust=robust)
    expected = []
    for t in range(len(batch)):
        ep = batch[t]
        predict = lambda q, ep=ep: learner.adapt(ep.support_x, ep.support_y)(q)  # noqa: E731
        if method == "aq":
            attacked = robust.attack(predict, ep.query_x, ep.query_y, generator=robust.generator(ep.query_x))
            expected.append(F.cross_entropy(predict(attacked), ep.query_y))
        else:
            expected.append(F.cross_entropy(predict(ep.query_x), ep.query_y) + robust.trades_term(predict, ep.query_x))
    expected = torch.stack(expected).mean()
    wanted = torch.autograd.grad(expected, list(learner.parameters()), materialize_grads=True)
    loss, metrics = learner.meta_loss(batch)
    loss.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-10)
    assert all(torch.allclose(p.grad, g, rtol=1e-8, atol=1e-12) for p, g in zip(learner.parameters(), wanted))
    clean = learner_class(learner.encoder).meta_loss(batch)[0]
    assert float(loss) > float(clean)  # the attacked loss is the larger


@pytest.mark.parametrize("algorithm, method", [("maml", "aq"), ("maml", "adml"), ("anil", "trades"),
                                               ("protonet", "trades"), ("matchingnet", "aq")])
def test_evaluation_of_a_robustly_trained_learner_is_clean(algorithm, method):
    values = {"algorithm": algorithm, "dataset": "omniglot", "backbone": "conv4", "ways": 5, "shots": 1,
              "inner_lr": 0.4}
    robust_learner = build_learner(Config.from_dict({**values, "robust_training": method}))
    plain = build_learner(Config.from_dict(values))
    batch = EpisodeSampler(_bands(), ways=5, shots=1, queries=3, seed=0).task_batch(0, 3)
    for name, metric in robust_learner.task_metrics(batch).items():
        assert torch.equal(metric, plain.task_metrics(batch)[name]), name
    robust_loss, _ = robust_learner.meta_loss(batch)
    assert float(robust_loss) > float(plain.meta_loss(batch)[0])  # training (train mode) is attacked
    tasks = EpisodeSampler(_bands(), ways=5, shots=1, queries=3, seed=0)
    attack = pgd(0.2, steps=2)
    for target in ("support", "both"):  # the seams pass evaluation's inputs through: poisoning differentiates
        assert evaluate_under_attack(robust_learner, tasks, attack, 3, target=target)["loss"].mean == \
            evaluate_under_attack(plain, tasks, attack, 3, target=target)["loss"].mean


def test_robust_training_settings_are_checked_by_name():
    base = {"dataset": "omniglot", "backbone": "conv4"}
    for bad, message in (
            ({"algorithm": "protonet", "robust_training": "adml"}, "'adml' attacks the support set of an inner loop"),
            ({"algorithm": "reptile", "robust_training": "aq"}, "robust_training='aq' applies to algorithms maml"),
            ({"algorithm": "maml", "robust_eps": 0.1}, "robust_eps=0.1 set(s) the training attack, but robust_training is none"),
            ({"algorithm": "maml", "robust_training": "aq", "robust_steps": 3}, "robust_attack 'fgsm' is one L-inf step"),
            ({"algorithm": "maml", "robust_training": "aq", "trades_beta": 1.0}, "trades_beta applies to robust_training 'trades'"),
            ({"algorithm": "maml", "robust_training": "aq", "robust_eps": 0}, "robust_eps"),
            ({"algorithm": "maml", "robust_training": "bim"}, "robust_training"),
            ({"algorithm": "maml", "robust_training": "aq", "robust_attack": "pgd"}, "with robust_steps 1 is FGSM"),
            ({"algorithm": "maml++", "robust_training": "aq", "per_step_bn_statistics": True},
             "robust_training with per_step_bn_statistics is not supported"),
            ({"algorithm": "reptile", "inner_trim": 0.2}, "inner_trim trims the inner loss of the MAML family")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Config.from_dict({**base, **bad})
    with pytest.raises(ConfigError, match="attacks classification inputs in \\[0, 1\\]; 'sinusoid' is regression"):
        Config.from_dict({"robust_training": "aq"})
    for bad, message in (({"method": "fast"}, "method must be one of aq, adml, trades"),
                         ({"method": "aq", "beta": -1.0}, "beta must be a finite number >= 0"),
                         ({"method": "aq", "attack": 0.1}, "attack must be a fastadapt.robust.Attack")):
        with pytest.raises(ValueError, match=message):
            RobustTraining(**bad)
    with pytest.raises(ValueError, match="'aq' or 'trades'"):
        ProtoNet(Conv4.omniglot(ways=None), robust=RobustTraining("adml"))
    from fastadapt.nn import MLP

    mlp = MLP(4, [8], 3)
    vmapped = MAML(mlp, 0.1, execution="vmap", **RobustTraining("aq").seams(mlp))
    with pytest.raises(ValueError, match="cannot run under torch.func.vmap"):
        vmapped.meta_loss(TaskBatch(torch.rand(2, 6, 4), torch.randint(0, 3, (2, 6)), torch.rand(2, 6, 4),
                                    torch.randint(0, 3, (2, 6))))
    config = Config.from_dict({**base, "algorithm": "maml", "robust_training": "trades", "robust_attack": "pgd",
                               "robust_steps": 3, "robust_eps": 0.05, "trades_beta": 2.0, "seed": 4})
    assert config.robust_options() == RobustTraining("trades", pgd(0.05, steps=3), beta=2.0, seed=4)


def test_a_robust_run_repeats_and_resumes_exactly(tmp_path):
    from fastadapt.data import DatasetInfo, register_dataset

    bands = _bands()
    register_dataset(DatasetInfo("bands-robust", "20 classes of bands", lambda a, o: {"train": bands, "test": bands},
                                 lambda a, o: (1, 28, 28)))
    config = {"algorithm": "maml", "dataset": "bands-robust", "backbone": "conv4", "ways": 5, "shots": 1, "queries": 2,
              "eval_queries": 3, "meta_batch": 2, "iterations": 6, "checkpoint_every": 3, "log_every": 1,
              "eval_episodes": 4, "threads": 1, "inner_lr": 0.4, "robust_training": "adml"}
    assert_repeats_and_resumes_exactly(config, tmp_path, cut_at=3)


def test_a_trimmed_inner_loss_drops_the_worst_support_examples_on_every_path(float64):
    from fastadapt.algorithms.objectives import trimmed_loss

    batch = _batch(tasks=2, shots=5, queries=2)
    model = _model()
    theta = dict(model.named_parameters())
    expected = []
    for t in range(len(batch)):
        params = dict(theta)
        for _ in range(2):
            each = F.cross_entropy(forward(model, params, batch.support_x[t]), batch.support_y[t], reduction="none")
            loss = each.sort().values[:15].mean()  # 25 examples less the 40% = 10 worst
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, materialize_grads=True)
            params = {n: p - 0.3 * g for (n, p), g in zip(params.items(), grads)}
        expected.append(F.cross_entropy(forward(model, params, batch.query_x[t]), batch.query_y[t]))
    expected = torch.stack(expected).mean()
    wanted = torch.autograd.grad(expected, list(model.parameters()), materialize_grads=True)
    for execution, checkpoint in (("loop", False), ("loop", True), ("per-task", False), ("vmap", False)):
        model.zero_grad()
        maml = MAML(model, 0.3, inner_steps=2, execution=execution, checkpoint_inner_loop=checkpoint,
                    inner_loss_fn=trimmed_loss("classification", 0.4))
        loss, _ = maml.meta_loss(batch)
        loss.backward()
        assert float(loss) == pytest.approx(float(expected), rel=1e-10), execution
        assert all(torch.allclose(p.grad if p.grad is not None else torch.zeros_like(p), g, rtol=1e-8, atol=1e-11)
                   for p, g in zip(model.parameters(), wanted)), execution
    learner = build_learner(Config.from_dict({"algorithm": "maml", "dataset": "omniglot", "backbone": "conv4",
                                              "inner_trim": 0.4}))
    assert learner.inner_loss_fn is not None
    with pytest.raises(ConfigError, match="inner_trim trims the inner loss of the MAML family; 'protonet'"):
        Config.from_dict({"algorithm": "protonet", "dataset": "omniglot", "backbone": "conv4", "inner_trim": 0.2})
    with pytest.raises(ValueError, match="trim must be a fraction in"):
        trimmed_loss("classification", 1.0)
