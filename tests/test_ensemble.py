"""Keeping the best validated checkpoints and evaluating their ensemble (MAML++'s test protocol)."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

import fastadapt
from fastadapt.algorithms.objectives import task_metrics
from fastadapt.data.episodes import TaskBatch
from fastadapt.training.checkpoint import CheckpointError, load_checkpoint, ranked_validation_steps
from fastadapt.training.config import Config, ConfigError
from fastadapt.training.evaluate import evaluate_ensemble, evaluate_learner
from fastadapt.training import experiment
from fastadapt.training.experiment import build_learner

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(iterations=60, log_every=10, checkpoint_every=60, validation_every=10, validation_episodes=20,
             eval_episodes=10, meta_batch=5, threads=1)


def _ranked(run):
    with open(run / "metrics.csv", newline="") as f:
        return ranked_validation_steps(csv.DictReader(f))


def test_keep_best_keeps_exactly_the_best_validated_weights(tmp_path):
    run = tmp_path / "run"
    fastadapt.train({**SMALL, "keep_best": 3}, run, progress=False)
    ranked = _ranked(run)
    assert len(ranked) == 6
    kept = sorted(int(p.stem[len("top-"):]) for p in (run / "checkpoints").glob("top-*.json"))
    assert kept == sorted(ranked[:3])
    best_tensors, best_state = load_checkpoint(run / "checkpoints" / "best.json")
    top_tensors, top_state = load_checkpoint(run / "checkpoints" / f"top-{ranked[0]:09d}.json")
    assert top_state["step"] == best_state["step"] == ranked[0]
    assert all(torch.equal(best_tensors[k], top_tensors[k]) for k in best_tensors)


def test_the_ensemble_averages_its_members_outputs(tmp_path):
    run = tmp_path / "run"
    fastadapt.train({**SMALL, "keep_best": 3}, run, progress=False)
    result = fastadapt.evaluate(run, episodes=6, ensemble=3)
    ranked = _ranked(run)
    assert result["ensemble"] == 3 and result["checkpoints"] == [f"top-{step:09d}.json" for step in ranked[:3]]
    assert (run / "evals" / "sinusoid-5w10s-1steps-6ep-top3.json").is_file()
    config = fastadapt.api.run_config(run)
    members = []
    for name in result["checkpoints"]:
        learner = build_learner(config)
        tensors, _ = load_checkpoint(run / "checkpoints" / name)
        learner.load_state_dict({k[len("learner."):]: v for k, v in tensors.items()})
        members.append(learner)
    tasks = experiment.test_source(config)
    batch = tasks.task_batch(0, 6)
    mean = torch.stack([m.query_outputs(batch) for m in members]).mean(0)
    by_hand = torch.stack([task_metrics("regression", mean[t], batch.query_y[t])["loss"] for t in range(6)])
    assert result["mean"] == pytest.approx(float(by_hand.mean()), rel=1e-6)
    singles = [evaluate_learner(m, tasks, 6)["loss"].mean for m in members]
    assert all(abs(result["mean"] - s) > 1e-6 for s in singles)
    # an ensemble of one model twice is that model
    twice = evaluate_ensemble([members[0], members[0]], tasks, 6)["loss"].mean
    assert twice == pytest.approx(singles[0], rel=1e-6)


def test_an_ensemble_of_weights_not_kept_is_refused_naming_the_step(tmp_path):
    run = tmp_path / "run"
    fastadapt.train(SMALL, run, progress=False)  # keep_best 1: best.json and the last step's checkpoint
    ranked = _ranked(run)
    kept = {ranked[0], 60}
    rank = next(i for i, step in enumerate(ranked) if step not in kept)
    with pytest.raises(CheckpointError, match=rf"validation number {rank + 1} \(step {ranked[rank]}\) has no "
                                              rf"checkpoint left.*keep_best >= {rank + 1}"):
        fastadapt.evaluate(run, episodes=4, ensemble=rank + 1)
    with pytest.raises(CheckpointError, match="an ensemble of 7 needs 7 validations; .* has 6"):
        fastadapt.evaluate(run, episodes=4, ensemble=7)
    with pytest.raises(ConfigError, match="ensemble must be >= 1"):
        fastadapt.evaluate(run, episodes=4, ensemble=0)
    with pytest.raises(ConfigError, match="keep_best=2 needs validation_every > 0"):
        Config.from_dict({"keep_best": 2})


@pytest.mark.parametrize("algorithm", ["maml", "maml++", "protonet", "matchingnet", "baseline", "reptile", "imaml"])
def test_query_outputs_give_the_learners_own_accuracy(algorithm):
    extra = {"inner_steps": 2, "eval_inner_steps": 2} if algorithm in ("maml++", "reptile", "imaml") else {}
    config = Config(algorithm=algorithm, dataset="omniglot", backbone="conv4", ways=3, shots=1, **extra)
    learner = build_learner(config)
    generator = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.rand(2, 3, 1, 28, 28, generator=generator), torch.arange(3).repeat(2, 1),
                      torch.rand(2, 6, 1, 28, 28, generator=generator), torch.arange(3).repeat(2, 2))
    outputs = learner.query_outputs(batch)
    assert outputs.shape == (2, 6, 3)
    metrics = learner.task_metrics(batch)
    accuracy = (outputs.argmax(-1) == batch.query_y).float().mean(1)
    assert torch.equal(accuracy, metrics["accuracy"])


def test_eval_command_ensemble_and_threads_flags(tmp_path):
    run = tmp_path / "run"
    fastadapt.train({**SMALL, "keep_best": 2}, run, progress=False)
    done = subprocess.run([sys.executable, "-m", "fastadapt.cli", "eval", str(run), "--episodes", "4",
                           "--ensemble", "2", "--threads", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "10-shot, 1 inner step, ensemble of the 2 best checkpoints: mse" in done.stdout
    refused = subprocess.run([sys.executable, "-m", "fastadapt.cli", "eval", str(run), "--ensemble", "7"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "an ensemble of 7 needs 7 validations" in refused.stderr and "Traceback" not in refused.stderr
