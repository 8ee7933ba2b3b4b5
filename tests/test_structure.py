"""The fast path by structure, not by class: any model whose forward is proven to be a conv /
BatchNorm / ReLU / max-pool / Linear chain gets it; every other model gets exactly its own forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadapt import IMAML, MAML, Reptile, TaskBatch
from fastadapt.functional.fused_block import fused_forward
from fastadapt.functional.structure import fixed_structure, layer_chain
from fastadapt.functional.task_batched import task_batched_forward, thread_safe_forward
from fastadapt.nn import Conv4
from meta_grad_helpers import assert_grads_close, engine_grads, reference_meta_grad

pytestmark = pytest.mark.usefixtures("float64")

EXECUTIONS = ["loop", "per-task", "graph"]


def _batch(tasks=3, ways=3, shots=2, queries=4, size=16, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.rand(tasks, ways * shots, 1, size, size, generator=g),
                     torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous(),
                     torch.rand(tasks, ways * queries, 1, size, size, generator=g),
                     torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous())


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():  # BN weights away from 1 so per-parameter second-order terms are exercised
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.double()


def _small_conv4(cls=Conv4) -> Conv4:
    torch.manual_seed(0)
    return _randomised(cls(in_channels=1, ways=3, hidden=6, image_size=16))


class ScaledConv4(Conv4):
    """A Conv4 subclass whose own forward differs from Conv4's."""

    def forward(self, x):
        return 2 * super().forward(x) + 0.5


def _sequential_conv4(hidden=6, ways=3, size=16, channels=1, view_flatten=False) -> nn.Module:
    """Conv4 as a peer library (or a user) writes it: blocks in an nn.Sequential."""
    blocks = []
    for i in range(4):
        blocks += [nn.Conv2d(channels if i == 0 else hidden, hidden, 3, padding=1),
                   nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
    dim = hidden * (size // 16) ** 2
    if view_flatten:
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(*blocks)
                self.classifier = nn.Linear(dim, ways)

            def forward(self, x):
                x = self.body(x)
                return self.classifier(x.view(x.size(0), -1))
        return Net()
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(dim, ways))


class Residual(nn.Module):
    """Conv layers with a residual connection: not a chain."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6, track_running_stats=False)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(4)
        self.head = nn.Linear(6 * 16, 3)

    def forward(self, x):
        h = F.relu(self.norm(self.conv1(x)))
        h = h + F.relu(self.conv2(h))
        return self.head(self.pool(h).flatten(1))


def _meta_grads_match(model, execution, steps=2):
    learner = MAML(model, inner_lr=0.3, inner_steps=steps, execution=execution)
    batch = _batch()
    assert_grads_close(engine_grads(learner, batch), reference_meta_grad(learner, batch))
    return learner, batch


def test_a_subclass_overriding_forward_gets_its_own_function():
    model = _small_conv4(ScaledConv4)
    assert layer_chain(model) is None and fused_forward(model) is None and task_batched_forward(model) is None
    learner = MAML(model, inner_lr=0.3, inner_steps=2)
    batch = _batch()
    plain = MAML(_small_conv4(), inner_lr=0.3, inner_steps=2)
    assert not torch.allclose(learner.meta_loss(batch)[0], plain.meta_loss(batch)[0])  # not Conv4's loss


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_subclass_residual_and_sequential_models_match_the_reference(execution):
    for model in (_small_conv4(ScaledConv4), _randomised(Residual()), _randomised(_sequential_conv4()),
                  _randomised(_sequential_conv4(view_flatten=True))):
        _meta_grads_match(model, execution)


def test_a_users_sequential_conv4_gets_the_fast_path():
    for model in (_sequential_conv4(), _sequential_conv4(view_flatten=True)):
        model = _randomised(model)
        assert fused_forward(model) is not None and task_batched_forward(model) is not None
        assert thread_safe_forward(model)
        learner, batch = _meta_grads_match(model, "loop")
        assert learner.plan(batch).path == "task-groups"


def test_a_model_edited_after_the_learner_was_built_gets_its_new_function():
    model = _small_conv4()
    learner = MAML(model, inner_lr=0.3, inner_steps=2)
    batch = _batch()
    assert learner.plan(batch).path == "task-groups"
    engine_grads(learner, batch)
    model.features[3] = nn.AvgPool2d(2)                      # a layer replaced: no longer a known chain
    assert learner.plan(batch).path == "per-task"
    assert_grads_close(engine_grads(learner, batch), reference_meta_grad(learner, batch))
    model.features[3] = nn.MaxPool2d(2)
    model.features[3].ceil_mode = True                       # a hyperparameter changed: still a chain,
    assert fused_forward(model) is None                     # but not the reordered first block
    assert_grads_close(engine_grads(learner, batch), reference_meta_grad(learner, batch))
    model.features[3].ceil_mode = False
    handle = model.features[2].register_forward_hook(lambda m, i, out: out * 0.5)  # a hook: own forward
    assert learner.plan(batch).path == "per-task"
    assert_grads_close(engine_grads(learner, batch), reference_meta_grad(learner, batch))
    handle.remove()
    model.forward = lambda x: Conv4.forward(model, x) * 3     # an instance forward
    assert layer_chain(model) is None
    assert_grads_close(engine_grads(learner, batch), reference_meta_grad(learner, batch))


def _reptile_reference(model: nn.Module, batch: TaskBatch, lr: float, steps: int) -> list[torch.Tensor]:
    """Reptile's direction by plain SGD on each task's whole support set through the model's own forward."""
    theta = {k: v.detach() for k, v in model.named_parameters()}
    adapted = []
    for t in range(len(batch)):
        phi = dict(theta)
        for _ in range(steps):
            leaves = {k: v.requires_grad_() for k, v in ((k, v.detach().clone()) for k, v in phi.items())}
            out = torch.func.functional_call(model, leaves, (batch.support_x[t],))
            grads = torch.autograd.grad(F.cross_entropy(out, batch.support_y[t]), list(leaves.values()))
            phi = {k: v.detach() - lr * g for (k, v), g in zip(leaves.items(), grads)}
        adapted.append(phi)
    return [theta[k] - torch.stack([phi[k] for phi in adapted]).mean(0) for k in theta]


@pytest.mark.parametrize("edit", ["subclass", "residual", "edited after the learner was built"])
def test_reptile_and_imaml_plans_give_each_model_its_own_function(edit):
    """The learners without a trajectory graph plan by structure too: a model that is not (or no
    longer) a chain fine-tunes and solves task by task through its own forward."""
    batch = _batch()
    models = {"subclass": lambda: _small_conv4(ScaledConv4), "residual": lambda: _randomised(Residual()),
              "edited after the learner was built": _small_conv4}
    model = models[edit]()
    reptile = Reptile(model, inner_lr=0.3, inner_steps=2, inner_optimizer="sgd")
    imaml = IMAML(model, inner_lr=0.3, inner_steps=2, cg_steps=3, task_group=2)
    reference_imaml = IMAML(model, inner_lr=0.3, inner_steps=2, cg_steps=3)  # task by task: functional_call
    if edit.startswith("edited"):
        assert reptile.plan(batch).path == imaml.plan(batch).path == "task-groups"
        assert_grads_close(engine_grads(reptile, batch), _reptile_reference(model, batch, 0.3, 2))
        assert_grads_close(engine_grads(imaml, batch), engine_grads(reference_imaml, batch))
        model.forward = lambda x: Conv4.forward(model, x) * 3 + 0.5
    assert reptile.plan(batch).path == imaml.plan(batch).path == "per-task"
    assert_grads_close(engine_grads(reptile, batch), _reptile_reference(model, batch, 0.3, 2))
    assert_grads_close(engine_grads(imaml, batch), engine_grads(reference_imaml, batch))
    grouped = IMAML(_small_conv4(), inner_lr=0.3, inner_steps=2, cg_steps=3, task_group=2)
    assert not torch.allclose(imaml.meta_loss(batch)[0], grouped.meta_loss(batch)[0])  # not plain Conv4's


def test_running_statistics_and_subclassed_layers_are_not_chains():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    running = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten())
    subclassed = nn.Sequential(MyConv(1, 2, 3), nn.ReLU(), nn.Flatten())
    assert layer_chain(running) is None and layer_chain(subclassed) is None
    ok = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.ReLU(), nn.Flatten())
    assert [name for name, _ in layer_chain(ok)] == ["0", "1", "2", "3"]


def test_fixed_structure_reads_the_model_once():
    model = _small_conv4()
    with fixed_structure(model):
        chain = layer_chain(model)
        model.head = nn.Linear(6, 3)            # edits inside the block are not seen (documented)
        assert layer_chain(model) is chain
    assert layer_chain(model) is not chain
