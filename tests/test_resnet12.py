"""ResNet-12: the standard shape and size, DropBlock's contract, exact meta-gradients through the
planner's per-task path, and its place in configs."""

from __future__ import annotations

import pytest
import torch

from fastadapt import MAML, ProtoNet, TaskBatch
from fastadapt.nn import DropBlock, ResNet12
from fastadapt.training.config import Config, ConfigError
from fastadapt.training.experiment import build_learner
from meta_grad_helpers import assert_grads_close, engine_grads, reference_meta_grad


def test_the_standard_resnet12_has_its_published_size_and_a_640_d_embedding():
    model = ResNet12(in_channels=3, ways=None)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(12.4e6, rel=0.01)
    assert model(torch.zeros(2, 3, 84, 84)).shape == (2, 640)
    assert ResNet12(in_channels=1, ways=5, channels=(4, 8, 8, 16))(torch.zeros(3, 1, 28, 28)).shape == (3, 5)
    with pytest.raises(ValueError, match=r"channels must be 4 positive integers"):
        ResNet12(channels=(64, 160, 320))


def test_dropblock_drops_squares_at_its_rate_in_training_only():
    torch.manual_seed(0)
    block = DropBlock(drop_rate=0.1, block_size=5)
    x = torch.ones(64, 8, 21, 21)
    out = block(x)
    dropped = (out == 0).float().mean().item()
    assert 0.07 < dropped < 0.13
    assert out.sum().item() == pytest.approx(x.sum().item(), rel=0.02)  # rescaled: the mean is kept
    zeros = (out[0, 0] == 0).nonzero()
    if len(zeros):  # dropped units come in squares: a dropped unit has a dropped neighbour
        r, c = zeros[0].tolist()
        assert (out[0, 0, max(r - 1, 0): r + 2, max(c - 1, 0): c + 2] == 0).sum() > 1
    assert torch.equal(block.eval()(x), x)
    torch.manual_seed(1)
    first = DropBlock(0.1, 3).train()(x)
    torch.manual_seed(1)
    assert torch.equal(DropBlock(0.1, 3).train()(x), first)  # the global generator's seed fixes it
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\)"):
        DropBlock(1.0, 3)


@pytest.mark.usefixtures("float64")
def test_maml_through_a_resnet12_equals_the_reference_loop():
    torch.manual_seed(0)
    model = ResNet12(in_channels=1, ways=3, channels=(3, 4, 4, 5)).double()
    learner = MAML(model, inner_lr=0.1, inner_steps=2)
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.rand(2, 3, 1, 16, 16, generator=g), torch.arange(3).expand(2, -1).contiguous(),
                      torch.rand(2, 6, 1, 16, 16, generator=g), torch.arange(3).repeat(2).expand(2, -1).contiguous())
    assert learner.plan(batch).path == "per-task"  # residual: not a chain
    assert_grads_close(engine_grads(learner, batch), reference_meta_grad(learner, batch))


def test_configs_build_a_resnet12_and_refuse_dropblock_elsewhere():
    config = Config(algorithm="protonet", dataset="mnist", backbone="resnet12", drop_rate=0.1)
    learner = build_learner(config)
    assert isinstance(learner, ProtoNet) and isinstance(learner.encoder, ResNet12)
    assert learner.encoder.features[3].drop.drop_rate == 0.1 and learner.encoder.features[0].drop.drop_rate == 0.0
    with pytest.raises(ConfigError, match=r"drop_rate \(DropBlock\) applies to backbone resnet12, not 'conv4'"):
        Config.from_dict({"algorithm": "protonet", "dataset": "mnist", "backbone": "conv4", "drop_rate": 0.1})
