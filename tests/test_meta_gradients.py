"""The engine's meta-gradients against a plain per-task reference loop, in float64.

This is what catches wrong second-order gradients (for instance torch.func.vmap through
training-mode BatchNorm, ../shared/notes/repro_vmap_batchnorm.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastadapt import ANIL, FOMAML, MAML, MetaSGD, TaskBatch
from fastadapt.nn import MLP, Conv4
from meta_grad_helpers import reference_meta_grad


pytestmark = pytest.mark.usefixtures("float64")


def _image_batch(tasks=3, ways=3, shots=2, queries=4, size=16, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    y_s = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    y_q = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    return TaskBatch(
        torch.rand(tasks, ways * shots, 1, size, size, generator=g, dtype=torch.float64),
        y_s.contiguous(),
        torch.rand(tasks, ways * queries, 1, size, size, generator=g, dtype=torch.float64),
        y_q.contiguous(),
    )


def _conv4(seed=0, pooling="max") -> Conv4:
    torch.manual_seed(seed)
    model = Conv4(in_channels=1, ways=3, hidden=6, image_size=16, pooling=pooling).double()
    with torch.no_grad():  # BN weights away from 1 so per-parameter second-order terms are exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def engine_meta_grad(learner, batch):
    learner.zero_grad(set_to_none=True)
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    return [q.grad for q in learner.parameters() if q.requires_grad]


def assert_close(engine, reference, tol=1e-9):
    """Per-parameter relative difference; the denominator is floored at 1e-3 of the whole gradient's
    norm, so gradients that are zero in exact arithmetic (a conv bias before BatchNorm) compare at
    the scale of the others instead of dividing round-off by round-off."""
    assert len(engine) == len(reference)
    # None is autograd's zero: a parameter the loss does not use (the conv bias BatchNorm cancels).
    engine = [torch.zeros_like(r) if e is None else e for e, r in zip(engine, reference)]
    reference = [torch.zeros_like(e) if r is None else r for e, r in zip(engine, reference)]
    floor = 1e-3 * torch.cat([r.reshape(-1) for r in reference]).norm()
    for e, r in zip(engine, reference):
        rel = (e - r).norm() / torch.maximum(r.norm(), floor)
        assert rel <= tol, f"relative difference {rel:.3e} > {tol}"


LEARNERS = {
    "maml-1": lambda m, ex: MAML(m, inner_lr=0.3, inner_steps=1, execution=ex),
    "maml-5": lambda m, ex: MAML(m, inner_lr=0.1, inner_steps=5, execution=ex),
    "fomaml-2": lambda m, ex: FOMAML(m, inner_lr=0.3, inner_steps=2, execution=ex),
    "metasgd-2": lambda m, ex: MetaSGD(m, inner_lr=0.2, inner_steps=2, execution=ex),
    "anil-3": lambda m, ex: ANIL(m, inner_lr=0.3, inner_steps=3, execution=ex),
}


@pytest.mark.parametrize("execution", ["loop", "loop-checkpointed", "per-task", "per-task-checkpointed", "graph"])
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_conv4_batchnorm_meta_gradient_matches_reference(name, execution):
    learner = LEARNERS[name](_conv4(), execution.removesuffix("-checkpointed"))
    learner.checkpoint_inner_loop = execution.endswith("-checkpointed")
    batch = _image_batch()
    if name.startswith("metasgd"):  # learned rates away from their shared start value
        with torch.no_grad():
            for r in learner.inner_lrs:
                r.mul_(torch.empty_like(r).uniform_(0.5, 1.5))
    assert_close(engine_meta_grad(learner, batch), reference_meta_grad(learner, batch))


@pytest.mark.parametrize("execution", ["loop", "graph"])
def test_strided_conv4_meta_gradient_matches_reference(execution):
    learner = LEARNERS["maml-5"](_conv4(pooling="stride"), execution)
    batch = _image_batch()
    assert_close(engine_meta_grad(learner, batch), reference_meta_grad(learner, batch))


def test_default_execution_for_conv4_is_exact_loop():
    assert MAML(_conv4()).plan(_image_batch()).path == "task-groups"


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_mlp_vmap_meta_gradient_matches_reference(name):
    torch.manual_seed(1)
    learner = LEARNERS[name](MLP(1, [16, 16], 1).double(), "auto")
    learner.task = "regression"
    g = torch.Generator().manual_seed(3)
    batch = TaskBatch(*(torch.randn(4, 6, 1, generator=g) for _ in range(4)))
    assert learner.plan(batch).path == "vmap"
    assert_close(engine_meta_grad(learner, batch), reference_meta_grad(learner, batch, F.mse_loss))


def test_second_order_maml_matches_central_finite_differences():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
    learner = MAML(model, inner_lr=0.5, inner_steps=2, task="regression", execution="loop")
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.randn(2, 5, 2, generator=g), torch.randn(2, 5, 1, generator=g),
                      torch.randn(2, 7, 2, generator=g), torch.randn(2, 7, 1, generator=g))
    analytic = torch.cat([gr.flatten() for gr in engine_meta_grad(learner, batch)])
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    eps, numeric = 1e-6, torch.empty_like(flat)
    for i in range(flat.numel()):
        values = []
        for sign in (1, -1):
            shifted = flat.clone()
            shifted[i] += sign * eps
            torch.nn.utils.vector_to_parameters(shifted, model.parameters())
            with torch.no_grad():
                values.append(learner.meta_loss(batch)[0])
        numeric[i] = (values[0] - values[1]) / (2 * eps)
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    assert (analytic - numeric).abs().max() <= 1e-7 * max(1.0, numeric.abs().max())
    first_order = FOMAML(model, inner_lr=0.5, inner_steps=2, task="regression", execution="loop")
    fo = torch.cat([gr.flatten() for gr in engine_meta_grad(first_order, batch)])
    assert (fo - numeric).abs().max() > 1e-4  # the test can tell first from second order


def test_meta_loss_leaves_the_user_module_untouched():
    model = _conv4()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = MAML(model, inner_lr=0.3, inner_steps=2)
    learner.meta_loss(_image_batch())[0].backward()
    learner.adapt(_image_batch()[0].support_x, _image_batch()[0].support_y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_vmap_asked_for_a_batchnorm_model_runs_the_exact_path_and_says_why():
    learner = MAML(_conv4(), inner_lr=0.3, inner_steps=1, execution="vmap")
    batch = _image_batch()
    plan = learner.plan(batch)
    assert plan.path == "per-task" and "BatchNorm" in str(plan)
    assert_close(engine_meta_grad(learner, batch), reference_meta_grad(learner, batch))


def test_the_reference_comparison_catches_vmap_through_batchnorm():
    learner = MAML(_conv4(), inner_lr=0.3, inner_steps=1)
    batch = _image_batch()
    learner.zero_grad(set_to_none=True)  # the vmap path run directly, to show what the planner avoids
    losses, _ = learner._vmapped(batch, 1, False, None)
    losses.mean().backward()
    engine = [q.grad for q in learner.parameters() if q.requires_grad]
    reference = reference_meta_grad(learner, batch)
    worst = max(float((e - r).norm() / r.norm()) for e, r in zip(engine, reference) if r.norm() > 1e-6)
    if worst <= 1e-9:
        pytest.skip(f"torch {torch.__version__} gets vmap through BatchNorm right: the refusal could be lifted")
    assert worst > 1e-6


def _smoothed(output, target):
    return F.cross_entropy(output, target, label_smoothing=0.2)


def _log_cosh(output, target):
    return torch.log(torch.cosh(output - target)).mean()


@pytest.mark.parametrize("execution", ["loop", "loop-checkpointed", "per-task", "per-task-checkpointed", "graph"])
def test_a_loss_fn_of_yours_changes_the_meta_gradient_as_in_the_reference(execution):
    learner = MAML(_conv4(), inner_lr=0.3, inner_steps=2, execution=execution.removesuffix("-checkpointed"),
                   checkpoint_inner_loop=execution.endswith("-checkpointed"), loss_fn=_smoothed)
    batch = _image_batch()
    engine = engine_meta_grad(learner, batch)
    assert_close(engine, reference_meta_grad(learner, batch, _smoothed))
    plain = reference_meta_grad(learner, batch)
    assert max(float((e - p).norm()) for e, p in zip(engine, plain) if e is not None and p is not None) > 1e-4


@pytest.mark.parametrize("execution", ["auto", "vmap", "graph"])
def test_a_loss_fn_of_yours_on_the_mlp_paths(execution):
    torch.manual_seed(1)
    learner = MAML(MLP(1, [16, 16], 1).double(), inner_lr=0.1, inner_steps=2, task="regression", execution=execution,
                   loss_fn=_log_cosh)
    g = torch.Generator().manual_seed(3)
    batch = TaskBatch(*(torch.randn(4, 6, 1, generator=g) for _ in range(4)))
    assert learner.plan(batch).path == {"auto": "per-task", "vmap": "vmap", "graph": "graph"}[execution]
    assert_close(engine_meta_grad(learner, batch), reference_meta_grad(learner, batch, _log_cosh))
    with torch.no_grad():  # the loss metric is the objective's
        outputs = learner.query_outputs(batch)
    expected = torch.stack([_log_cosh(outputs[t], batch.query_y[t]) for t in range(len(batch))])
    assert torch.allclose(learner.task_metrics(batch)["loss"], expected)
