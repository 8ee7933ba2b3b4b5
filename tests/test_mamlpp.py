"""MAML++ as options of the gradient learner: each option changes what it should, the multi-step loss
with per-step rates and BatchNorm matches a plain autograd reference in float64, the recipes load,
and MAML++ learns on real Omniglot."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fastadapt import FOMAML, MAML, EpisodeSampler, TaskBatch
from fastadapt.algorithms import MAMLPlusPlus
from fastadapt.algorithms.annealing import multi_step_loss_weights
from fastadapt.cli import _run_config, build_parser
from fastadapt.functional.fused_block import fused_forward
from fastadapt.functional.optim import sgd
from fastadapt.functional.rules import meta_gradients
from fastadapt.functional.task_batched import task_batched_forward
from fastadapt.nn import Conv4
from fastadapt.training import evaluate_learner, meta_train
from fastadapt.training.config import Config, ConfigError
from fastadapt.training.recipes import load_recipe
from fastadapt.training.experiment import build_learner
from fastadapt.training.trainer import learning_rate
from meta_grad_helpers import assert_grads_close, engine_grads

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTADAPT_DATA") or ROOT.parent / "shared" / "data")
needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot" / "images_background.zip").is_file(),
                                    reason=f"Omniglot zips not found under {DATA}/omniglot (set FASTADAPT_DATA)")


pytestmark = pytest.mark.usefixtures("one_thread")


def _conv4(seed=0) -> Conv4:
    torch.manual_seed(seed)
    model = Conv4(in_channels=1, ways=3, hidden=6, image_size=16)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def _batch(tasks=2, ways=3, shots=2, queries=2, size=16, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    ys = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return TaskBatch(torch.rand(tasks, ways * shots, 1, size, size, generator=g, dtype=dtype), ys,
                     torch.rand(tasks, ways * queries, 1, size, size, generator=g, dtype=dtype), yq)


# -- multi-step loss weights --------------------------------------------------------------------

def test_multi_step_loss_weights_start_equal_anneal_to_the_last_step_and_sum_to_one():
    steps, span = 5, 100
    history = [multi_step_loss_weights(steps, i, span) for i in range(span)]
    assert history[0] == [0.2] * 5
    for weights in history:
        assert abs(sum(weights) - 1) < 1e-12 and min(weights) >= 0.03 / steps - 1e-15
    lasts = [w[-1] for w in history]
    firsts = [w[0] for w in history]
    assert all(a < b for a, b in zip(lasts[:97], lasts[1:98], strict=True))  # rises until the floor is reached
    assert all(a > b for a, b in zip(firsts[:97], firsts[1:98], strict=True))
    assert history[-1][:4] == [0.03 / steps] * 4 and abs(history[-1][-1] - (1 - 4 * 0.03 / steps)) < 1e-12
    assert multi_step_loss_weights(steps, span, span) is None  # then only the last step's loss
    assert multi_step_loss_weights(steps, 0, 0) is None
    with pytest.raises(ValueError, match="anneal_iterations must be an integer >= 0, got -1"):
        multi_step_loss_weights(steps, 0, -1)


def test_the_learner_anneals_its_multi_step_loss_as_iterations_pass():
    learner = MAMLPlusPlus(_conv4(), inner_lr=0.1, inner_steps=2, multi_step_loss_iterations=3)
    batch = _batch()
    seen = []
    for _ in range(4):
        seen.append(learner.step_weights())
        learner.meta_loss(batch)[0].backward()
    assert seen[0] == [0.5, 0.5] and seen[1][1] > seen[0][1] and seen[2][1] > seen[1][1] and seen[3] is None
    assert int(learner.iteration) == 4
    with torch.no_grad():  # no gradients, no iteration
        learner.meta_loss(batch)
    assert int(learner.iteration) == 4
    # the clock is saved with the weights: a resumed learner continues the schedule
    resumed = MAMLPlusPlus(_conv4(1), inner_lr=0.1, inner_steps=2, multi_step_loss_iterations=5)
    resumed.load_state_dict(learner.state_dict())
    assert int(resumed.iteration) == 4 and resumed.step_weights() == multi_step_loss_weights(2, 4, 5)


# -- the float64 reference: multi-step loss, per-step rates, per-step BatchNorm ----------------

def _reference(learner, batch, weights):
    """Plain autograd: per task, per step, the per-step BN weights swapped in, the loss summed."""
    model, norm = learner.model, learner.step_norm
    names = learner.adapt_names
    steps = learner.inner_steps

    def at(step, adapted):
        slot = {}
        if norm is not None and norm.weights is not None:
            for layer, w, b in zip(norm.names, norm.weights, norm.biases):
                slot[f"{layer}.weight"], slot[f"{layer}.bias"] = w[step], b[step]
        return {**dict(model.named_parameters()), **adapted, **slot}

    total = 0.0
    for t in range(len(batch)):
        adapted = {n: p for n, p in model.named_parameters() if n in names}
        loss = 0.0
        for step in range(steps):
            support = functional_call(model, at(step, adapted), (batch.support_x[t],))
            inner = F.cross_entropy(support, batch.support_y[t])
            grads = torch.autograd.grad(inner, list(adapted.values()), create_graph=True)
            rates = learner.step_sizes(step)
            adapted = {n: adapted[n] - rates[n] * g for n, g in zip(names, grads)}
            if weights[step] > 0:
                query = functional_call(model, at(step + 1, adapted), (batch.query_x[t],))
                loss = loss + weights[step] * F.cross_entropy(query, batch.query_y[t])
        total = total + loss
    trainable = [p for p in learner.parameters() if p.requires_grad]
    return torch.autograd.grad(total / len(batch), trainable, allow_unused=True)


def _mamlpp(execution="loop", **options):
    learner = MAMLPlusPlus(_conv4(), inner_lr=0.2, inner_steps=3, multi_step_loss_iterations=4, execution=execution,
                           **options)
    with torch.no_grad():  # per-step values apart, so a mixed-up step shows
        for rates in learner.per_step_lrs:
            rates.mul_(torch.tensor([1.0, 0.7, 0.4]))
        if learner.step_norm is not None:
            for w, b in zip(learner.step_norm.weights, learner.step_norm.biases):
                w.mul_(torch.linspace(0.8, 1.2, w.shape[0])[:, None])
                b.add_(torch.linspace(-0.1, 0.1, b.shape[0])[:, None])
    return learner


@pytest.mark.parametrize("execution", ["loop", "loop-per-task", "graph", "loop-checkpointed",
                                       "loop-per-task-checkpointed"])
def test_multi_step_loss_with_per_step_rates_and_batchnorm_matches_autograd_reference(float64, execution):
    checkpointed = execution.endswith("-checkpointed")
    execution = execution.removesuffix("-checkpointed")
    learner = _mamlpp("per-task" if execution == "loop-per-task" else execution, checkpoint_inner_loop=checkpointed)
    batch = _batch()
    if execution == "loop":  # "loop" runs the support phases of all tasks at once
        assert learner.plan(batch).path == "task-groups"
    learner.iteration.fill_(1)  # annealed weights, not equal ones
    weights = learner.step_weights()
    assert weights is not None and len(set(weights)) == 2
    assert_grads_close(engine_grads(learner, batch), _reference(learner, batch, weights))


@pytest.mark.parametrize("first_order", [False, True])
def test_all_tasks_at_once_equals_task_by_task_in_loss_metrics_and_gradients(float64, first_order):
    # 3 tasks in groups of 2 (uneven), a zero middle weight; first order too
    batch = _batch(tasks=3)
    results = []
    for at_once in (True, False):
        learner = _mamlpp("loop" if at_once else "per-task", first_order=first_order, task_group=2)
        learner.step_weights = lambda: [0.3, 0.0, 0.7]
        learner.zero_grad(set_to_none=True)
        loss, metrics = learner.meta_loss(batch)
        loss.backward()
        results.append((loss.detach(), metrics, [p.grad for p in learner.parameters() if p.requires_grad]))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-12, atol=0)
    assert all(torch.allclose(metrics_a[k], metrics_b[k], rtol=1e-12, atol=1e-15) for k in metrics_b)
    assert_grads_close(grads_a, grads_b, tol=1e-12)


def test_batched_engine_refuses_step_parameters_that_the_inner_loop_adapts():
    learner = _mamlpp()
    params = learner.meta_params()

    class Hooks:
        def params(self, step):
            return {"head.weight": params["head.weight"]}

        def context(self, step):
            return contextlib.nullcontext()

    with pytest.raises(ValueError, match=r"step hooks replace parameter\(s\) \['head.weight'\], which the inner loop"):
        meta_gradients(task_batched_forward(learner.model), params, _batch(), loss_fn=F.cross_entropy, steps=1,
                       optimizer=sgd(0.1), names=["head.weight"], first_order=False, query_pass=learner._query_pass,
                       wrt=list(params.values()), group=2, hooks=Hooks())


def test_after_the_multi_step_phase_only_the_last_step_counts(float64):
    learner = _mamlpp()
    learner.iteration.fill_(4)
    batch = _batch()
    assert learner.step_weights() is None
    assert_grads_close(engine_grads(learner, batch), _reference(learner, batch, [0.0, 0.0, 1.0]))


def test_per_step_rates_and_batchnorm_weights_of_every_step_receive_gradients():
    learner = _mamlpp()
    engine_grads(learner, _batch())
    for name, rates in zip(learner.adapt_names, learner.per_step_lrs):
        assert rates.shape == (3,)
        if name.endswith("weight"):
            assert (rates.grad.abs() > 0).all(), name
    norm = learner.step_norm
    assert norm.weights[0].shape == (4, 6)  # slots for θ_0 .. θ_3
    for w, b in zip(norm.weights, norm.biases):
        assert (w.grad.abs().sum(1) > 0).all() and (b.grad.abs().sum(1) > 0).all()
    # the layers' own BatchNorm parameters are replaced by the per-step ones, and do not adapt
    assert not any(".1.weight" in n or ".1.bias" in n for n in learner.adapt_names)
    own = dict(learner.model.named_parameters())["features.1.weight"]
    assert own.grad is None or own.grad.abs().max() == 0
    with pytest.raises(ValueError, match="choose one"):
        MAMLPlusPlus(_conv4(), learn_inner_lr=True)


def test_derivative_order_annealing_switches_from_first_to_second_order(float64):
    model = _conv4()
    batch = _batch()
    annealed = MAML(model, inner_lr=0.3, inner_steps=2, first_order_iterations=2)
    first = engine_grads(FOMAML(model, inner_lr=0.3, inner_steps=2), batch)
    second = engine_grads(MAML(model, inner_lr=0.3, inner_steps=2), batch)
    for iteration in range(3):
        assert annealed.uses_first_order() == (iteration < 2)
        assert_grads_close(engine_grads(annealed, batch), first if iteration < 2 else second)
    assert int(annealed.iteration) == 3
    assert max(float((a - b).norm() / b.norm()) for a, b in zip(first, second) if b.norm() > 0) > 1e-4
    with pytest.raises(ValueError, match="first order throughout"):
        FOMAML(model, first_order_iterations=5)


# -- per-step BatchNorm statistics --------------------------------------------------------------

def test_per_step_statistics_leave_training_gradients_unchanged_and_track_each_step(float64):
    batch = _batch(tasks=1)
    with_stats = MAMLPlusPlus(_conv4(), inner_lr=0.2, inner_steps=2, multi_step_loss_iterations=0,
                              per_step_bn_statistics=True)
    without = MAMLPlusPlus(_conv4(), inner_lr=0.2, inner_steps=2, multi_step_loss_iterations=0)
    # the statistics run their forwards unfused; other learners on the same model keep the reordered block
    assert fused_forward(with_stats.model) is not None
    # transductive batch statistics normalise in training: the statistics change no gradient
    assert_grads_close(engine_grads(with_stats, batch), engine_grads(without, batch))
    norm = with_stats.step_norm
    mean, var = norm.running(0)
    # slot 0: the support set at θ_0, one update with momentum 0.1 from (0, 1)
    first = with_stats.model.features[0](batch.support_x[0])
    assert torch.allclose(mean[0], 0.1 * first.mean((0, 2, 3)), rtol=0, atol=1e-12)
    assert torch.allclose(var[0], 0.9 + 0.1 * first.var((0, 2, 3), unbiased=True), rtol=0, atol=1e-12)
    assert (mean.abs().sum(1) > 0).all()  # slots 0, 1 (support) and 2 (query after the last step)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    with_stats.task_metrics(batch)  # evaluation reads the statistics and never writes them
    with torch.no_grad():  # nor does a meta-loss without gradients (it is not training)
        with_stats.meta_loss(batch)
    assert all(torch.equal(v, before[k]) for k, v in norm.state_dict().items())


def test_checkpointing_updates_per_step_statistics_once_and_keeps_the_gradient(float64):
    batch = _batch(tasks=2)
    learners = [MAMLPlusPlus(_conv4(), inner_lr=0.2, inner_steps=2, per_step_bn_statistics=True,
                             checkpoint_inner_loop=checkpoint) for checkpoint in (False, True)]
    plain, checkpointed = (engine_grads(learner, batch) for learner in learners)
    assert_grads_close(checkpointed, plain, tol=1e-12)
    states = [learner.step_norm.state_dict() for learner in learners]
    assert all(torch.allclose(states[0][k], states[1][k], rtol=0, atol=1e-14) for k in states[0])


def test_per_step_statistics_refuse_a_forward_that_skips_batchnorm_layers():
    norm = MAMLPlusPlus(_conv4(), inner_steps=2, per_step_bn_statistics=True).step_norm
    x = torch.rand(4, 6, 5, 5)
    with pytest.raises(RuntimeError, match="saw 1 batch_norm calls in one forward; the model has 4"):
        with norm.hooks(training=True).context(0):
            F.batch_norm(x, None, None, training=True)


def test_per_step_statistics_make_evaluation_inductive():
    batch = _batch(tasks=1, queries=3)
    ep = batch[0]
    for statistics in (True, False):
        learner = MAMLPlusPlus(_conv4(), inner_lr=0.2, inner_steps=2, per_step_bn_statistics=statistics)
        learner.meta_loss(_batch(tasks=2, seed=1))[0].backward()  # some statistics
        with torch.no_grad():
            predictor = learner.adapt(ep.support_x, ep.support_y)
            together = predictor(ep.query_x)
            alone = torch.cat([predictor(ep.query_x[i:i + 1]) for i in range(len(ep.query_x))])
        # with running statistics a query's prediction ignores the other queries; with batch statistics not
        assert torch.allclose(together, alone, atol=1e-5) == statistics


def test_per_step_options_refuse_models_and_step_counts_they_cannot_serve():
    with pytest.raises(ValueError, match="need a model with BatchNorm layers"):
        MAML(torch.nn.Sequential(torch.nn.Linear(2, 2)), per_step_bn_weights=True)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten())
        MAML(model, per_step_bn_statistics=True)
    learner = MAMLPlusPlus(_conv4(), inner_lr=0.2, inner_steps=2)
    with pytest.raises(ValueError, match="for 2 inner steps; 3 were asked for"):
        learner.task_metrics(_batch(), inner_steps=3)
    assert learner.task_metrics(_batch(), inner_steps=1)["accuracy"].shape == (2,)


# -- configs, recipes, schedule -----------------------------------------------------------------

def test_maml_plus_plus_config_defaults_and_errors():
    config = Config.from_dict({"algorithm": "maml++", "dataset": "omniglot", "backbone": "conv4"})
    learner = build_learner(config)
    assert isinstance(learner, MAMLPlusPlus) and learner.per_step_lrs is not None and learner.step_norm is not None
    assert learner.multi_step_loss_iterations == 5000 and learner.step_norm.statistics is False
    sinusoid = build_learner(Config.from_dict({"algorithm": "maml++", "inner_steps": 2}))
    assert sinusoid.step_norm is None and sinusoid.per_step_lrs is not None  # the MLP has no BatchNorm
    plain = build_learner(Config.from_dict({"algorithm": "maml", "inner_optimizer": "adam"}))
    assert plain.inner_optimizer == "adam" and plain.per_step_lrs is None and not hasattr(plain, "iteration")
    for values, match in [
        ({"algorithm": "protonet", "dataset": "omniglot", "backbone": "conv4", "multi_step_loss_iterations": 10},
         "multi_step_loss_iterations=10 applies to the MAML family"),
        ({"algorithm": "maml++", "dataset": "omniglot", "backbone": "conv4", "eval_inner_steps": 6, "inner_steps": 5},
         "eval_inner_steps=6 exceeds inner_steps=5"),
        ({"algorithm": "maml", "per_step_bn_statistics": True}, "need BatchNorm layers; backbone 'mlp'"),
        ({"algorithm": "maml", "inner_optimizer": "rmsprop"}, "inner_optimizer must be one of sgd, momentum, adam"),
        ({"algorithm": "maml", "min_meta_lr": 1e-5}, "min_meta_lr is the floor of the cosine schedule"),
    ]:
        with pytest.raises(ConfigError, match=match):
            Config.from_dict(values)


def test_run_defaults_keep_the_cosine_floor_below_a_meta_lr_the_user_sets():
    parse = build_parser().parse_args
    assert _run_config(parse(["run", "--algo", "maml++", "--dataset", "omniglot"])).min_meta_lr == 1e-5
    slow = _run_config(parse(["run", "--algo", "maml++", "--dataset", "omniglot", "--meta-lr", "1e-5"]))
    assert (slow.meta_lr, slow.min_meta_lr) == (1e-5, pytest.approx(1e-7))  # 1% of the rate, as the default


@pytest.mark.parametrize("benchmark, batch", [("5w1s", 16), ("5w5s", 8), ("20w1s", 16), ("20w5s", 8)])
def test_recipes_load_with_the_released_hyperparameters(benchmark, batch):
    config = load_recipe(ROOT / "recipes" / "mamlpp" / f"omniglot-{benchmark}.yaml")
    assert (config.algorithm, config.inner_steps, config.eval_inner_steps, config.inner_lr) == ("maml++", 5, 5, 0.1)
    assert (config.meta_batch, config.iterations, config.multi_step_loss_iterations) == (batch, 50000, 5000)
    assert config.schedule == "cosine" and learning_rate(config, config.iterations) > config.min_meta_lr == 1e-5
    assert f"{config.ways}w{config.shots}s" == benchmark


@needs_omniglot
def test_maml_plus_plus_learns_omniglot_5way_1shot_far_above_chance():
    from fastadapt.data.omniglot import omniglot_splits

    splits = omniglot_splits(DATA)  # the default decoded-image cache: warm after the first run
    torch.manual_seed(0)
    learner = MAMLPlusPlus(Conv4.omniglot(ways=5), inner_lr=0.4, inner_steps=2, multi_step_loss_iterations=30)
    meta_train(learner, EpisodeSampler(splits["train"], 5, 1, 1, seed=0), iterations=30, meta_batch=4, meta_lr=3e-3)
    result = evaluate_learner(learner, EpisodeSampler(splits["test"], 5, 1, 5, seed=0), episodes=80)
    assert result["accuracy"].mean > 0.4, result["accuracy"]  # chance is 0.2
