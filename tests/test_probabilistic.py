"""Probabilistic learners (VAMPIRE, PLATIPUS, BMAML): their pieces against closed forms, their
meta-gradients against finite differences in float64, learning on Omniglot, and deterministic draws."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import fastadapt
from fastadapt.data.episodes import TaskBatch
from fastadapt.probabilistic import BMAML, PLATIPUS, VAMPIRE, kl_divergence, svgd
from fastadapt.probabilistic.svgd import svgd_direction
from fastadapt.functional import adapt
from fastadapt.training.config import Config, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

OMNIGLOT = Path(os.environ.get("FASTADAPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "omniglot"


def test_the_kl_of_diagonal_gaussians_is_the_closed_form(float64):
    generator = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 4), "b": (5,)}
    draw = lambda: {n: torch.randn(*s, generator=generator) for n, s in shapes.items()}  # noqa: E731
    mean_q, log_q, mean_p, log_p = draw(), draw(), draw(), draw()
    expected = sum(torch.distributions.kl_divergence(torch.distributions.Normal(mean_q[n], log_q[n].exp()),
                                                     torch.distributions.Normal(mean_p[n], log_p[n].exp())).sum()
                   for n in shapes)
    assert float(kl_divergence(mean_q, log_q, mean_p, log_p)) == pytest.approx(float(expected), rel=1e-12)
    assert float(kl_divergence(mean_q, log_q, mean_q, log_q)) == 0.0


def test_svgd_moves_particles_to_a_gaussians_mean_and_variance(float64):
    """Target N(2, 1.5^2), particles from N(-3, 0.1^2): SVGD with the RBF kernel (median heuristic)."""
    generator = torch.Generator().manual_seed(0)
    particles = {"x": -3 + 0.1 * torch.randn(200, 1, generator=generator)}
    loss = lambda point, step: ((point["x"] - 2.0) ** 2 / (2 * 1.5 ** 2)).sum()  # noqa: E731  -log p, summed
    final = adapt(loss, particles, optimizer=svgd(0.5), steps=1500, keep_graph=False).points[-1]["x"]
    assert float(final.mean()) == pytest.approx(2.0, abs=0.05)
    assert float(final.std()) == pytest.approx(1.5, rel=0.08)


def test_svgd_direction_is_the_kernel_smoothed_gradient_plus_repulsion(float64):
    x = torch.tensor([[0.0], [1.0], [3.0]])
    grads = torch.tensor([[1.0], [-2.0], [0.5]])
    h = 0.7
    by_hand = torch.zeros(3, 1)
    for i in range(3):
        for j in range(3):
            k = math.exp(-float((x[j] - x[i]) ** 2) / h)
            by_hand[i] += k * grads[j] - 2 * (x[j] - x[i]) / h * k
    assert torch.allclose(svgd_direction(x, grads, bandwidth=h), by_hand / 3)


def _tiny_batch(generator: torch.Generator) -> TaskBatch:
    x = torch.randn(2, 4, 3, generator=generator)
    return TaskBatch(x, torch.tensor([[0, 1, 0, 1]] * 2), torch.randn(2, 4, 3, generator=generator),
                     torch.tensor([[1, 0, 1, 0]] * 2))


def _learners() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    net = lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # noqa: E731
    return {"vampire": VAMPIRE(net(), inner_lr=0.3, inner_steps=2, samples=2, kl_weight=0.05, prior_std=0.3),
            "platipus": PLATIPUS(net(), inner_lr=0.3, inner_steps=2, samples=2, kl_weight=0.05, prior_std=0.3,
                                 posterior_std=0.2, execution="per-task"),
            "bmaml": BMAML(net(), inner_lr=0.3, inner_steps=2, particles=3)}


@pytest.mark.parametrize("name", ["vampire", "platipus", "bmaml"])
def test_the_reparameterised_meta_gradient_matches_finite_differences(name, float64):
    learner = _learners()[name].double()
    batch = _tiny_batch(torch.Generator().manual_seed(1))
    params = [p for p in learner.parameters() if p.requires_grad]
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    # (BMAML's particles are its weights: the model's own parameters get no gradient)
    analytic = torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in params])
    learner.draws.zero_()  # the same draws again
    if name == "bmaml":  # the leader is a constant of the chaser loss (a stop-gradient): held at its value here
        episodes = [(e.support_x, e.support_y, e.query_x, e.query_y) for e in (batch[t] for t in range(len(batch)))]
        leaders = [learner.chaser_loss(*e)[2] for e in episodes]

        def value() -> float:
            with torch.no_grad():
                return sum(float(learner.chaser_loss(*e, leader=lead)[0]) for e, lead in zip(episodes, leaders)) / 2
    else:
        def value() -> float:
            with torch.no_grad():
                return float(learner.meta_loss(batch)[0])

    numeric = []
    for p in params:
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            keep = float(flat[i])
            flat[i] = keep + 1e-6
            up = value()
            flat[i] = keep - 1e-6
            down = value()
            flat[i] = keep
            numeric.append((up - down) / 2e-6)
    assert torch.allclose(analytic, torch.tensor(numeric), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["vampire", "platipus", "bmaml"])
def test_sampling_is_deterministic_and_depends_on_the_episode_alone(name):
    learner = _learners()[name]
    batch = _tiny_batch(torch.Generator().manual_seed(2))
    samples = learner.query_samples(batch)
    assert samples.shape == (2, 4, learner.eval_samples, 2)
    assert torch.equal(samples, learner.query_samples(batch))
    # the same episode alone, or in another batch position: the same draws
    alone = TaskBatch(batch.support_x[1:], batch.support_y[1:], batch.query_x[1:], batch.query_y[1:])
    assert torch.equal(learner.query_samples(alone)[0], samples[1])
    if name != "bmaml":  # BMAML's particles are deterministic; the others' samples differ from each other
        assert not torch.allclose(samples[:, :, 0], samples[:, :, 1])
    predictor = learner.adapt(batch.support_x[0], batch.support_y[0])
    assert torch.allclose(predictor(batch.query_x[0]).exp(), torch.softmax(samples[0], -1).mean(1), atol=1e-6)
    # training draws follow the outer step, kept in the state dict
    learner.meta_loss(batch)[0].backward()
    assert int(learner.state_dict()["draws"]) == 1


def test_probabilistic_keys_are_checked_per_learner():
    with pytest.raises(ConfigError, match="chaser_steps=2 applies to bmaml, not 'vampire'"):
        Config(algorithm="vampire", chaser_steps=2)
    with pytest.raises(ConfigError, match="kl_weight=0.1 applies to vampire, platipus, not 'bmaml'"):
        Config(algorithm="bmaml", kl_weight=0.1)
    with pytest.raises(ConfigError, match="bmaml predicts with its 5 particles"):
        Config(algorithm="bmaml", eval_samples=10)
    with pytest.raises(ConfigError, match=r"samples=3 .*appl.* to algorithms vampire, platipus, bmaml, not 'maml'"):
        Config(algorithm="maml", samples=3)
    with pytest.raises(ConfigError, match="precision 'bf16' is not implemented for platipus"):
        Config(algorithm="platipus", precision="bf16")
    assert Config(algorithm="vampire").effective_samples == 2 and Config(algorithm="vampire").effective_eval_samples == 10


@pytest.mark.parametrize("name", ["vampire", "platipus", "bmaml"])
def test_a_probabilistic_run_repeats_and_resumes_exactly(name, tmp_path):
    from fastadapt.data import DatasetInfo, register_dataset
    from resume_helpers import assert_repeats_and_resumes_exactly
    from test_robust import _bands

    bands = _bands()
    register_dataset(DatasetInfo("bands-probabilistic", "20 classes of bands", lambda a, o: {"train": bands, "test": bands},
                                 lambda a, o: (1, 28, 28)))
    config = {"algorithm": name, "dataset": "bands-probabilistic", "backbone": "conv4", "ways": 3, "shots": 1,
              "queries": 1, "eval_queries": 2, "meta_batch": 2, "iterations": 4, "checkpoint_every": 2, "log_every": 1,
              "eval_episodes": 3, "threads": 1, "inner_lr": 0.4, "samples": 2}
    final = assert_repeats_and_resumes_exactly(config, tmp_path, cut_at=2)
    assert int(final["learner.draws"]) == 4


@pytest.mark.skipif(not (OMNIGLOT / "images_background.zip").is_file(), reason="needs ../shared/data/omniglot")
@pytest.mark.parametrize("name", ["vampire", "platipus", "bmaml"])
def test_each_probabilistic_learner_learns_omniglot_far_above_chance(name, tmp_path):
    result = fastadapt.train({"algorithm": name, "dataset": "omniglot", "data_root": str(OMNIGLOT.parent),
                              "backbone": "conv4", "ways": 5, "shots": 1,
                              "queries": 1, "eval_queries": 3, "inner_lr": 0.4, "meta_lr": 0.003, "meta_batch": 6,
                              "iterations": 50, "eval_episodes": 20, "eval_inner_steps": 3, "threads": 1,
                              "samples": 2, **({} if name == "bmaml" else {"eval_samples": 4})}, tmp_path / name,
                             progress=False)
    assert result["mean"] > 0.45, result["mean"]  # chance: 0.2


@pytest.mark.parametrize("name", ["vampire", "bmaml"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_vmapped_meta_batch_equals_the_task_by_task_one(float64, name, first_order, kind, monkeypatch):
    import fastadapt.probabilistic.base as base
    from fastadapt.data import SinusoidTasks
    from fastadapt.nn import MLP

    def run(vmapped):
        monkeypatch.setattr(base, "vmap_exact", lambda model: vmapped)
        torch.manual_seed(0)
        model = MLP(1 if kind == "regression" else 3, [8, 8], 1 if kind == "regression" else 2).double()
        learner = (VAMPIRE(model, 0.05, inner_steps=2, samples=3, kl_weight=1e-3, task=kind, first_order=first_order)
                   if name == "vampire" else BMAML(model, 0.05, inner_steps=2, particles=3, task=kind,
                                                   first_order=first_order))
        if kind == "regression":
            tasks = SinusoidTasks(seed=0).task_batch(0, 4)
            batch = TaskBatch(*(t.double() for t in (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)))
        else:
            batch = _tiny_batch(torch.Generator().manual_seed(2))
        loss, metrics = learner.meta_loss(batch)
        loss.backward()
        return (loss.detach(), metrics, [torch.zeros_like(p) if p.grad is None else p.grad for p in learner.parameters()],
                int(learner.draws))

    (loss, metrics, grads, draws), (ref_loss, ref_metrics, ref_grads, ref_draws) = run(True), run(False)
    assert torch.allclose(loss, ref_loss, rtol=1e-10) and draws == ref_draws == 1
    assert all(torch.allclose(metrics[k], ref_metrics[k], rtol=1e-9) for k in ref_metrics)
    assert all(torch.allclose(g, r, rtol=1e-8, atol=1e-12) for g, r in zip(grads, ref_grads))
    assert sum(float(g.abs().sum()) for g in grads) > 0


def _dropout_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


@pytest.mark.parametrize("name", ["vampire", "platipus", "bmaml"])
def test_sampling_learners_train_a_model_with_dropout(name):
    from fastadapt.data import SinusoidTasks

    make = {"vampire": VAMPIRE, "platipus": PLATIPUS, "bmaml": lambda m, lr, task: BMAML(m, lr, particles=2, task=task)}
    learner = make[name](_dropout_mlp(), 0.01, task="regression")
    loss, _ = learner.meta_loss(SinusoidTasks(seed=0).task_batch(0, 3))
    loss.backward()
    assert torch.isfinite(loss) and sum(float(p.grad.abs().sum()) for p in learner.parameters() if p.grad is not None) > 0


def test_platipus_keeps_frozen_weights_fixed_and_the_others_refuse_them():
    from fastadapt.data import SinusoidTasks

    model = _dropout_mlp()
    model[0].bias.requires_grad_(False)
    learner = PLATIPUS(model, 0.01, task="regression")
    batch = SinusoidTasks(seed=0).task_batch(0, 3)
    q_means = learner._stepped(batch.query_x, batch.query_y, learner.gamma_q, create_graph=False)
    assert torch.equal(q_means["0.bias"], model[0].bias.expand(3, 16))
    assert not torch.equal(q_means["0.weight"][0], model[0].weight)
    learner.meta_loss(batch)[0].backward()
    assert model[0].bias.grad is None and model[3].weight.grad.abs().sum() > 0
    for make in (VAMPIRE, BMAML):
        with pytest.raises(ValueError, match=r"\['0.bias'\] are frozen"):
            make(model, 0.01, task="regression")


@pytest.mark.parametrize("model_name", ["conv4", "mlp"])
def test_samples_run_as_one_batched_graph_equal_to_one_call_each(float64, model_name):
    from fastadapt.functional.task_batched import looped_forward
    from fastadapt.nn import MLP, Conv4
    from fastadapt.probabilistic.base import stacked_forward

    torch.manual_seed(0)
    # conv4: one grouped-convolution graph; mlp: vmap over the weight sets
    model = (Conv4.omniglot(ways=5) if model_name == "conv4" else MLP(1, [8, 8], 2)).double()
    weights = {n: (p.detach().unsqueeze(0) + 0.05 * torch.randn(3, *p.shape)).requires_grad_()
               for n, p in model.named_parameters()}
    x = torch.rand(5, 1, 28, 28) if model_name == "conv4" else torch.randn(5, 1)
    batched, looped = stacked_forward(model)(weights, x), looped_forward(model)(weights, x.expand(3, *x.shape))
    assert torch.allclose(batched, looped, atol=1e-10)
    def second_order(out):  # d/dw of the sum of the first-order gradient (conv biases before BatchNorm: unused)
        first = torch.autograd.grad(out.square().sum(), list(weights.values()), create_graph=True, materialize_grads=True)
        return torch.autograd.grad(sum(g.sum() for g in first), list(weights.values()), materialize_grads=True)

    assert all(torch.allclose(a, b, atol=1e-8) for a, b in zip(second_order(batched), second_order(looped)))


def test_eval_takes_another_sample_count_for_sampling_learners(tmp_path):
    run = tmp_path / "run"
    fastadapt.train({"algorithm": "vampire", "likelihood": "gaussian", "iterations": 3, "eval_episodes": 2,
                     "meta_batch": 2, "threads": 1, "shots": 5, "queries": 5, "eval_queries": 5}, run, progress=False)
    result = fastadapt.evaluate(run, episodes=4, samples=3)
    assert result["samples"] == 3 and len(result["bands"][0]["means"]) == 3
    assert (run / "evals" / "sinusoid-5w5s-1steps-3samples-4ep.json").is_file()
    assert fastadapt.evaluate(run, episodes=4)["samples"] == 10
    maml = tmp_path / "maml"
    fastadapt.train({"iterations": 2, "eval_episodes": 2, "meta_batch": 2, "threads": 1}, maml, progress=False)
    with pytest.raises(ConfigError, match="samples applies to vampire and platipus runs"):
        fastadapt.evaluate(maml, episodes=4, samples=3)


def test_the_command_line_trains_a_sampling_regressor_with_a_gaussian_output(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fastadapt.cli", "run", "--algo", "vampire", "--likelihood", "gaussian",
                           "--iterations", "2", "--meta-batch", "2", "--eval-episodes", "3", "--threads", "1",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "test mse:" in done.stdout and "pre-adaptation" not in done.stdout  # VAMPIRE logs no loss before adapting
