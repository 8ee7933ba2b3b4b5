"""Devices: a run lives where `device` says, refused clearly where that device is missing; on a CUDA
GPU every learner's meta-gradient equals the CPU's, and a run moves between GPU and CPU.

The GPU tests run where torch sees a CUDA GPU (they are skipped in CPU-only CI)."""

from __future__ import annotations

import json

import pytest
import torch

import fastadapt
from fastadapt.cli import main
from fastadapt.data import DeviceTasks, EpisodeSampler, ImageClassDataset, TaskBatch
from fastadapt.training.checkpoint import load_checkpoint
from fastadapt.training.config import Config, ConfigError
from fastadapt.training.experiment import build_learner

from meta_grad_helpers import assert_grads_close, engine_grads

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
OMNIGLOT = dict(dataset="omniglot", backbone="conv4", ways=5, shots=1, inner_steps=2)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "CPU", "cuda:"])
def test_device_values_are_checked(bad):
    with pytest.raises(ConfigError, match=f"device must be cpu, cuda or cuda:N .*got '{bad}'"):
        Config.from_dict({"device": bad})


def test_cli_refuses_an_unknown_device(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["run", "--device", "tpu"])
    assert stop.value.code == 2
    assert "argument --device: expected cpu, cuda or cuda:N (N a GPU index), got 'tpu'" in capsys.readouterr().err


@pytest.mark.skipif(CUDA, reason="checks the error where torch sees no GPU")
def test_cuda_where_there_is_none_is_one_clear_error_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", "--device", "cuda", "--iterations", "2", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda' was asked for" in err and "use device: cpu" in err
    assert not run.exists()


def test_device_tasks_moves_the_same_episodes():
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    source = EpisodeSampler(ImageClassDataset(images, torch.arange(40) // 4), ways=3, shots=1, queries=2, seed=5)
    placed = DeviceTasks(source, "meta")
    assert placed.seed == 5
    moved = placed.task_batch(3, 2)
    assert {t.device.type for t in (moved.support_x, moved.support_y, moved.query_x, moved.query_y)} == {"meta"}
    assert moved.support_x.shape == source.task_batch(3, 2).support_x.shape
    here, direct = DeviceTasks(source, "cpu").task_batch(3, 2), source.task_batch(3, 2)
    assert all(torch.equal(getattr(here, f), getattr(direct, f)) for f in ("support_x", "support_y", "query_x", "query_y"))
    assert torch.equal(DeviceTasks(source, "cpu").episode(7).query_x, source.episode(7).query_x)


def _batch(config: Config, tasks: int = 4, seed: int = 0, episodes: bool = False) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(config.ways)
    if config.algorithm == "baseline" and not episodes:  # a pre-training batch: global labels, no query set
        x = torch.rand(1, 16, 1, 28, 28, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 4800, (1, 16), generator=generator)
        return TaskBatch(x, y, x[:, :0], y[:, :0])
    support = torch.rand(tasks, config.ways * config.shots, 1, 28, 28, generator=generator, dtype=torch.float64)
    query = torch.rand(tasks, config.ways * 3, 1, 28, 28, generator=generator, dtype=torch.float64)
    return TaskBatch(support, labels.repeat_interleave(config.shots).expand(tasks, -1),
                     query, labels.repeat_interleave(3).expand(tasks, -1))


LEARNERS = {
    "maml": {}, "maml-task-by-task": {}, "fomaml": {}, "metasgd": {}, "anil": {},
    "maml++": dict(multi_step_loss_iterations=10), "imaml": {}, "reptile": {}, "protonet": {},
    "matchingnet-fce": dict(fce=True), "baseline": {},
}


@needs_cuda
@pytest.mark.parametrize("name", LEARNERS)
def test_meta_gradient_on_the_gpu_equals_the_cpu_in_float64(name):
    algorithm = name.split("-")[0]
    config = Config.from_dict({**OMNIGLOT, "algorithm": algorithm, **LEARNERS[name]})
    batch = _batch(config)
    grads = {}
    for device in ("cpu", "cuda"):
        learner = build_learner(config.replace(device=device)).double()
        if name == "maml-task-by-task":
            learner.task_group = 1
        torch.manual_seed(1)  # Reptile's mini-batch order comes from the global generator
        grads[device] = [g.cpu() if g is not None else None for g in engine_grads(learner, batch.to(device))]
    assert_grads_close(grads["cuda"], grads["cpu"], tol=1e-8)


@needs_cuda
@pytest.mark.parametrize("name", [n for n in LEARNERS if n != "maml-task-by-task"])
def test_evaluation_on_the_gpu_equals_the_cpu_in_float64(name):
    config = Config.from_dict({**OMNIGLOT, "algorithm": name.split("-")[0], **LEARNERS[name]})
    batch = _batch(config, episodes=True)
    metrics = {}
    for device in ("cpu", "cuda"):
        learner = build_learner(config.replace(device=device)).double()
        metrics[device] = {k: v.cpu() for k, v in learner.task_metrics(batch.to(device)).items()}
    assert metrics["cuda"].keys() == metrics["cpu"].keys()
    for key, value in metrics["cpu"].items():
        torch.testing.assert_close(metrics["cuda"][key], value, rtol=1e-7, atol=1e-9)


@needs_cuda
def test_bf16_on_the_gpu_is_as_close_to_fp32_as_on_the_cpu():
    config = Config.from_dict({**OMNIGLOT, "algorithm": "maml"})
    similarity = {}
    for device in ("cpu", "cuda"):
        placed = config.replace(device=device)
        batch = _batch(placed).to(device, torch.float32)
        reference = torch.cat([g.flatten() for g in engine_grads(build_learner(placed), batch)])
        grads = engine_grads(build_learner(placed.replace(precision="bf16")), batch)
        assert all(g.dtype == torch.float32 for g in grads)
        mixed = torch.cat([g.flatten() for g in grads])
        similarity[device] = float(torch.nn.functional.cosine_similarity(mixed, reference, dim=0))
    # random images make a noisy second-order gradient: bf16 keeps ~0.96 of its direction on the CPU
    assert similarity["cuda"] > 0.9 and similarity["cuda"] >= similarity["cpu"] - 0.05, similarity


@needs_cuda
def test_a_gpu_run_resumes_on_the_cpu_and_evaluates_on_either(tmp_path):
    settings = dict(iterations=40, log_every=10, checkpoint_every=20, eval_episodes=50, meta_batch=5)
    whole = fastadapt.train({**settings, "device": "cuda"}, tmp_path / "whole", progress=False)
    crashed = tmp_path / "crashed"
    fastadapt.train({**settings, "device": "cuda"}, crashed, progress=False)
    for leftover in ("step-000000040.json", "step-000000040.safetensors"):  # as if killed after step 20
        (crashed / "checkpoints" / leftover).unlink()
    (crashed / "results.json").unlink()
    tensors, _ = load_checkpoint(crashed / "checkpoints" / "step-000000020.json")
    assert all(t.device.type == "cpu" for t in tensors.values())
    resumed = fastadapt.train(None, crashed, resume=True, device="cpu", progress=False)
    assert resumed["steps"] == 40
    assert resumed["mean"] == pytest.approx(whole["mean"], rel=1e-3)
    on_cpu = fastadapt.evaluate(tmp_path / "whole", episodes=50, device="cpu")
    on_gpu = fastadapt.evaluate(tmp_path / "whole", episodes=50)
    assert on_cpu["mean"] == pytest.approx(on_gpu["mean"], rel=1e-4)
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["device"] == "cuda"
