"""Reptile: the outer step against an independent torch.optim reference, batched against serial,
deterministic evaluation, clear errors, learning on sinusoids, and the command line."""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastadapt
from fastadapt import Reptile, SinusoidTasks, TaskBatch
from fastadapt.algorithms.reptile import CarriedAdamState, fine_tune_tasks, minibatch_order, reptile_optimizer
from fastadapt.functional.optim import AdamState, find_state
from fastadapt.functional.task_batched import task_batched_forward
from fastadapt.nn import MLP, Conv4
from fastadapt.training import evaluate_learner
from fastadapt.training.checkpoint import load_checkpoint, step_name
from fastadapt.training.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTADAPT_DATA") or ROOT.parent / "shared" / "data")
needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot" / "images_background.zip").is_file(),
                                    reason=f"Omniglot zips not found under {DATA}/omniglot (set FASTADAPT_DATA)")

WAYS, SHOTS, QUERIES = 3, 2, 2


def _batch(tasks: int = 4) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(WAYS).repeat_interleave(SHOTS)
    return TaskBatch(torch.rand(tasks, WAYS * SHOTS, 1, 16, 16, generator=g, dtype=torch.float64),
                     labels.expand(tasks, -1).contiguous(),
                     torch.rand(tasks, WAYS * QUERIES, 1, 16, 16, generator=g, dtype=torch.float64),
                     torch.arange(WAYS).repeat_interleave(QUERIES).expand(tasks, -1).contiguous())


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Conv4(in_channels=1, ways=WAYS, hidden=6, image_size=16).double()


def _direction(reptile: Reptile, batch: TaskBatch) -> list[torch.Tensor]:
    loss, _ = reptile.meta_loss(batch)
    return list(torch.autograd.grad(loss, list(reptile.parameters())))


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_batched_update_is_the_mean_of_serial_per_task_updates_in_float64(optimizer):
    reptile = Reptile(_model(), inner_lr=0.05, inner_steps=3, inner_optimizer=optimizer, inner_batch=4)
    batch = _batch()
    torch.manual_seed(123)  # the mini-batch order comes from torch's generator, task after task
    batched = _direction(reptile, batch)
    torch.manual_seed(123)
    serial = [_direction(reptile, one) for one in batch.split(1)]
    assert task_batched_forward(reptile.model) is not None  # the batch ran as one grouped graph
    for (name, _), b, *per_task in zip(reptile.named_parameters(), batched, *serial):
        mean = torch.stack(per_task).mean(0)
        # A conv bias before BatchNorm has a zero gradient up to rounding, which Adam's
        # normalisation blows up to ~1e-9 differently on the two paths: nothing is learned there.
        module, kind = name.rsplit(".", 1)
        conv_bias = kind == "bias" and isinstance(reptile.get_submodule(module), torch.nn.Conv2d)  # Conv4: BN follows
        assert torch.allclose(b, mean, rtol=1e-12, atol=1e-8 if conv_bias else 1e-15), name
    assert max(float(b.abs().max()) for b in batched) > 1e-4  # the inner loop moved the weights


def _reference_phi(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, steps: int,
                   batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Plain PyTorch: a copy of the module trained by torch.optim.Adam(betas=(0, 0.999)) on shuffled passes."""
    copy_ = copy.deepcopy(model)
    opt = torch.optim.Adam(copy_.parameters(), lr=lr, betas=(0.0, 0.999))
    torch.manual_seed(seed)
    order = torch.cat([torch.randperm(len(x)) for _ in range(math.ceil(steps * batch / len(x)))])
    for k in range(steps):
        index = order[k * batch:(k + 1) * batch]
        opt.zero_grad()
        F.cross_entropy(copy_(x[index]), y[index]).backward()
        opt.step()
    return {name: p.detach() for name, p in copy_.named_parameters()}


def test_one_serial_sgd_outer_step_moves_theta_toward_the_adapted_weights():
    model = _model()
    reptile = Reptile(model, inner_lr=0.01, inner_steps=4, inner_optimizer="adam", inner_batch=4)
    episode = _batch(1)[0]
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    phi = _reference_phi(model, episode.support_x, episode.support_y, lr=0.01, steps=4, batch=4, seed=7)
    epsilon = 0.3
    outer = torch.optim.SGD(reptile.parameters(), lr=epsilon)
    torch.manual_seed(7)
    loss, metrics = reptile.meta_loss(_batch(1))
    loss.backward()
    outer.step()
    for name, p in model.named_parameters():
        expected = theta[name] + epsilon * (phi[name] - theta[name])
        # absolute: a conv bias before BatchNorm has an exactly zero gradient, which the reference
        # computes as ~1e-16 round-off and Adam's normalisation turns into a ~1e-9 step
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-8), name
    assert sum(float((phi[n] - theta[n]).abs().sum()) for n in theta) > 1e-3
    assert set(metrics) == {"loss", "accuracy", "support_loss"}


def _query_loss_after_adam(model: torch.nn.Module, adam: torch.optim.Adam, episode: TaskBatch,
                           steps: int) -> torch.Tensor:
    """Fine-tunes a copy of `model` with a copy of `adam`'s state (full support batch); its query loss."""
    copy_ = copy.deepcopy(model)
    opt = torch.optim.Adam(copy_.parameters(), lr=adam.defaults["lr"], betas=adam.defaults["betas"])
    opt.load_state_dict(adam.state_dict())
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(copy_(episode.support_x[0]), episode.support_y[0]).backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(copy_(episode.query_x[0]), episode.query_y[0])


def test_persistent_inner_state_is_the_authors_serial_reptile_one_adam_carried_across_tasks_and_into_evaluation():
    model = _model()
    reference = copy.deepcopy(model)
    reptile = Reptile(model, inner_lr=0.01, inner_steps=3, inner_optimizer="adam", inner_state="persistent",
                      eval_inner_steps=4)
    outer = torch.optim.SGD(reptile.parameters(), lr=0.5)
    adam = torch.optim.Adam(reference.parameters(), lr=0.01, betas=(0.0, 0.999))
    for episode in _batch(3).split(1):  # the serial version: one task per outer step
        theta = [p.detach().clone() for p in reference.parameters()]
        for _ in range(3):  # Adam's state runs on; only the weights are restored after the task
            adam.zero_grad()
            F.cross_entropy(reference(episode.support_x[0]), episode.support_y[0]).backward()
            adam.step()
        with torch.no_grad():
            for p, t in zip(reference.parameters(), theta):
                p.copy_(t + 0.5 * (p - t))
        outer.zero_grad()
        loss, _ = reptile.meta_loss(episode)
        loss.backward()
        outer.step()
    carried = reptile.carried_state
    assert carried is not None and int(carried.count) == 9
    start = find_state(carried.start(1, reptile.inner_opt), AdamState)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-8), name  # conv biases before BatchNorm: see above
        assert torch.allclose(start.nu[name][0], adam.state[q]["exp_avg_sq"], rtol=1e-9, atol=1e-20), name
    episode = _batch(1)
    before = {k: v.clone() for k, v in carried.state_dict().items()}
    ours = reptile.task_metrics(episode)["loss"][0]
    assert torch.allclose(ours, _query_loss_after_adam(reference, adam, episode, steps=4), rtol=1e-7)
    fresh = Reptile(model, inner_lr=0.01, inner_optimizer="adam", eval_inner_steps=4).task_metrics(episode)["loss"][0]
    assert abs(float(ours - fresh)) > 1e-4  # the carried state changed the evaluation's fine-tuning
    assert all(torch.equal(v, before[k]) for k, v in carried.state_dict().items())  # evaluation leaves it


def test_carrying_tasks_run_at_once_equals_running_them_one_after_another_for_fixed_gradients():
    betas = (0.5, 0.9)  # beta1 > 0: the first moment is carried too
    opt = reptile_optimizer("adam", 0.1, adam_betas=betas)
    grads = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # task t's gradient
    carried = CarriedAdamState({"w": torch.zeros(3, dtype=torch.float64)}, betas)
    chained = opt.init({"w": torch.zeros(3, dtype=torch.float64)})
    for _ in range(2):  # two outer steps: the second starts from a non-zero state
        for t in range(4):
            for _ in range(2):
                _, chained = opt.update({"w": grads[t]}, chained, {"w": torch.zeros(3, dtype=torch.float64)})
        together = carried.start(4, opt)
        for _ in range(2):
            _, together = opt.update({"w": grads}, together, {"w": torch.zeros(4, 3, dtype=torch.float64)})
        carried.carry(together)
    start, chained = find_state(carried.start(1, opt), AdamState), find_state(chained, AdamState)
    assert start.count == chained.count == 16
    assert torch.allclose(start.mu["w"][0], chained.mu["w"], rtol=1e-12, atol=0)
    assert torch.allclose(start.nu["w"][0], chained.nu["w"], rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match=r"carry\(\) takes the final state of the tasks of the last start\(\)"):
        carried.carry(together)  # twice: the second would count the same tasks again


def test_a_batched_outer_step_carries_every_tasks_final_state_once():
    reptile = Reptile(_model(), inner_lr=0.01, inner_steps=3, inner_optimizer="adam", inner_state="persistent")
    carried = reptile.carried_state
    assert carried is not None
    reptile.meta_loss(_batch(2))  # a first step, so the next starts from a non-zero state
    before = {k: v.clone() for k, v in carried.state_dict().items()}
    batch = _batch(3)
    theta = {n: p.detach() for n, p in reptile.model.named_parameters()}
    _, _, final = fine_tune_tasks(task_batched_forward(reptile.model), theta, batch.support_x, batch.support_y,
                                  loss_fn=F.cross_entropy, steps=3, optimizer=reptile.inner_opt,
                                  generators=[None] * 3, state=carried.start(3, reptile.inner_opt))  # no shuffling
    final = find_state(final, AdamState)
    reptile.meta_loss(batch)
    assert int(carried.count) == 6 + 9
    for name in theta:
        expected = 0.999 ** 9 * before[f"nu.{name.replace('.', '__')}"] + sum(
            0.999 ** (3 * (2 - t)) * (final.nu[name][t] - 0.999 ** 3 * before[f"nu.{name.replace('.', '__')}"])
            for t in range(3))
        start = find_state(carried.start(1, reptile.inner_opt), AdamState)
        assert torch.allclose(start.nu[name][0], expected, rtol=1e-10, atol=1e-30), name
    after = {k: v.clone() for k, v in carried.state_dict().items()}
    reptile.task_metrics(_batch(2))
    reptile.adapt(batch.support_x[0], batch.support_y[0])
    assert all(torch.equal(v, after[k]) for k, v in carried.state_dict().items())  # evaluation leaves it


def test_minibatches_are_shuffled_passes_and_full_batches_when_the_support_set_is_small():
    order = minibatch_order(5, 2, 4, torch.Generator().manual_seed(0))
    flat = torch.cat(order)
    assert [len(b) for b in order] == [2, 2, 2, 2]
    assert sorted(flat[:5].tolist()) == [0, 1, 2, 3, 4]  # the first 5 indices: one pass
    assert all(b.tolist() == [0, 1, 2] for b in minibatch_order(3, 10, 2))


def test_evaluation_is_a_pure_function_of_the_episode_and_leaves_the_model_untouched():
    model = _model()
    reptile = Reptile(model, inner_lr=0.05, inner_steps=2, inner_optimizer="adam", inner_batch=4, eval_inner_steps=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = _batch(3)
    together = reptile.task_metrics(batch)
    alone = [reptile.task_metrics(one) for one in batch.split(1)]
    for name in ("loss", "accuracy", "loss_before"):  # one grouped graph or one task at a time: rounding apart
        assert torch.allclose(together[name], torch.cat([a[name] for a in alone]), rtol=1e-10, atol=0)
    assert not torch.equal(together["loss"], together["loss_before"])  # fine-tuning changed the predictions
    predicted = reptile.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    assert torch.allclose(F.cross_entropy(predicted, batch.query_y[0]), together["loss"][0])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_fine_tuning_needs_one_generator_per_task():
    model = _model()
    batch = _batch(3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="generators: one per task, got 1 for 3 tasks"):
        fine_tune_tasks(task_batched_forward(model), params, batch.support_x, batch.support_y, loss_fn=F.cross_entropy,
                        steps=1, optimizer=reptile_optimizer("sgd", 0.1), generators=[None])


def test_bad_options_are_refused_with_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match="inner_optimizer must be 'sgd', 'momentum' or 'adam', got 'rmsprop'"):
        Reptile(MLP(), inner_optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inner_batch must be an integer >= 1 or None, got 0"):
        Reptile(MLP(), inner_batch=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        Reptile(MLP(), inner_lr=-1.0)
    with pytest.raises(ValueError, match="inner_state 'persistent' carries Adam's moments .* inner_optimizer is 'sgd'"):
        Reptile(MLP(), inner_optimizer="sgd", inner_state="persistent")
    with pytest.raises(ValueError, match="inner_state must be one of 'fresh', 'persistent', got 'kept'"):
        Reptile(MLP(), inner_state="kept")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="inner_state='persistent' applies to algorithm 'reptile', not 'maml'"):
        Config.from_dict({"inner_state": "persistent"})
    with pytest.raises(ConfigError, match="inner_state 'persistent' .* got inner_optimizer 'sgd'"):
        Config.from_dict({"algorithm": "reptile", "inner_state": "persistent"})
    with pytest.raises(ConfigError, match="meta_momentum is the momentum of the outer SGD; optimizer is 'adam'"):
        Config.from_dict({"algorithm": "reptile", "meta_momentum": 0.0})
    with pytest.raises(ConfigError, match="inner_batch=.* applies to algorithm 'reptile', not 'maml'"):
        Config.from_dict({"inner_batch": 10})
    with pytest.raises(ConfigError, match="schedule must be one of .*linear; got 'linaer'"):
        Config.from_dict({"schedule": "linaer"})


@pytest.fixture()
def one_thread():
    """Thousands of tiny MLP steps: one thread is several times faster than two, and bounded in time
    when the two cores are shared (two threads can run 10x slower then)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_serial_reptile_learns_sinusoids_far_beyond_fine_tuning_an_untrained_net(one_thread):
    torch.manual_seed(0)
    reptile = Reptile(MLP(1, [40, 40], 1), inner_lr=0.01, inner_steps=32, inner_optimizer="sgd", task="regression")
    test = SinusoidTasks(10, 50, seed=999)
    untrained = evaluate_learner(reptile, test, episodes=100)["loss"].mean
    outer = torch.optim.SGD(reptile.parameters(), lr=1.0)
    source, iterations = SinusoidTasks(10, 10, seed=0), 200
    for step in range(iterations):  # serial: one task per outer step, epsilon annealed linearly to 0
        outer.param_groups[0]["lr"] = 1.0 * (1 - step / iterations)
        outer.zero_grad()
        loss, _ = reptile.meta_loss(source.task_batch(step, 1))
        loss.backward()
        outer.step()
    result = evaluate_learner(reptile, test, episodes=100)
    after, before = result["loss"].mean, result["loss_before"].mean
    assert after < 0.4 * before and after < 0.4 * untrained, (untrained, before, after)


@pytest.mark.parametrize("inner", [{}, {"inner_optimizer": "adam", "inner_state": "persistent"}])
def test_a_resumed_run_continues_exactly_the_mini_batch_order_and_carried_adam_state_included(tmp_path, one_thread,
                                                                                               inner):
    config = {"algorithm": "reptile", "inner_steps": 4, "inner_batch": 3, "optimizer": "sgd", "meta_momentum": 0.0,
              "meta_lr": 0.5, "schedule": "linear", "meta_batch": 2, "iterations": 6, "checkpoint_every": 3,
              "log_every": 1, "eval_episodes": 2, **inner}
    fastadapt.train(config, tmp_path / "straight", progress=False)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for path in (tmp_path / "resumed" / "checkpoints").glob(step_name(6) + ".*"):
        path.unlink()  # as if killed after the checkpoint of step 3
    fastadapt.train(out=tmp_path / "resumed", resume=True, progress=False)
    straight, _ = load_checkpoint(tmp_path / "straight" / "checkpoints" / f"{step_name(6)}.json")
    resumed, _ = load_checkpoint(tmp_path / "resumed" / "checkpoints" / f"{step_name(6)}.json")
    weights = [k for k in straight if k.startswith("learner.")]
    assert weights and all(torch.equal(straight[k], resumed[k]) for k in weights)
    assert any(k.startswith("learner.carried_state.nu.") for k in weights) == bool(inner)
    assert not torch.equal(straight["learner.model.head.weight"], load_checkpoint(
        tmp_path / "straight" / "checkpoints" / f"{step_name(3)}.json")[0]["learner.model.head.weight"])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastadapt.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_fastadapt_run_reptile_on_sinusoid(tmp_path):
    done = _cli("run", "--algo", "reptile", "--iterations", "3", "--eval-episodes", "4", "--threads", "1",
                "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    assert "post-adaptation mse" in done.stdout and (tmp_path / "r" / "results.json").is_file()


@needs_omniglot
def test_fastadapt_train_reptile_recipe(tmp_path):
    done = _cli("train", str(ROOT / "recipes" / "reptile" / "omniglot-5w1s.yaml"), "--set", "iterations=2",
                "--set", "eval_episodes=2", "--set", "eval_inner_steps=3", "--set", f"data_root={DATA}",
                "--set", "threads=1", "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout
