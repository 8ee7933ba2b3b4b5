"""`task_workers` in configs, recipes and the CLI: a MAML++ or iMAML run trains and tests exactly
as its one-thread twin, resumes with another worker count, and the key is refused where it cannot
apply."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

import fastadapt
import fastadapt.algorithms.imaml as imaml
import fastadapt.functional.rules as rules
import fastadapt.training.evaluate as evaluate
from fastadapt.cli import main
from fastadapt.training.checkpoint import load_checkpoint, step_name
from fastadapt.training.config import Config, ConfigError

DATA = Path(os.environ.get("FASTADAPT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot" / "images_background.zip").is_file(),
                                    reason=f"Omniglot zips not found under {DATA}/omniglot (set FASTADAPT_DATA)")

# MAML++ on real Omniglot 5w1s, shrunk: 2 inner steps (per-step rates and BatchNorm weights, the
# multi-step loss), meta-batch 6 (three task groups of 2), 6 outer steps, a checkpoint every 2.
TINY = dict(algorithm="maml++", dataset="omniglot", backbone="conv4", data_root=str(DATA), ways=5, shots=1,
            queries=2, eval_queries=2, inner_steps=2, meta_batch=6, iterations=6, log_every=1,
            checkpoint_every=2, multi_step_loss_iterations=3, eval_episodes=70, threads=1)
# iMAML the same size, task by task: 2 inner steps, 3 conjugate-gradient steps, damped
TINY_IMAML = {**{k: v for k, v in TINY.items() if k != "multi_step_loss_iterations"},
              "algorithm": "imaml", "inner_lr": 0.1, "cg_steps": 3, "cg_damping": 22.0}


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in ("tasks_per_s", "elapsed_s")} for row in csv.DictReader(f)]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run / "checkpoints" / f"{step_name(step)}.json")
    return {k: v for k, v in tensors.items() if k.startswith(("learner.", "optimizer."))}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@needs_omniglot
@pytest.mark.usefixtures("one_thread")  # the runs train on one thread; the count is restored after
@pytest.mark.parametrize("config", [TINY, TINY_IMAML], ids=["maml++", "imaml"])
def test_a_run_with_task_workers_trains_exactly_as_its_one_thread_twin(tmp_path, monkeypatch, config):
    seen: list[int] = []
    map_in_threads = rules.map_in_threads

    def recorded(fn, items, workers):
        seen.append(workers)
        return map_in_threads(fn, items, workers)

    for module in (rules, imaml, evaluate):
        monkeypatch.setattr(module, "map_in_threads", recorded)
    alone = fastadapt.train(config, tmp_path / "alone", progress=False)
    assert set(seen) == {1}
    seen.clear()
    workers = fastadapt.train({**config, "task_workers": 3}, tmp_path / "workers", progress=False)
    # every training step, then the test: its 70 episodes in three batches, at once
    assert workers["config"]["task_workers"] == 3 and seen == [3] * (config["iterations"] + 1)
    assert _rows(tmp_path / "workers") == _rows(tmp_path / "alone")
    assert _same(_weights(tmp_path / "workers", 6), _weights(tmp_path / "alone", 6))
    assert (workers["mean"], workers["ci95"]) == (alone["mean"], alone["ci95"])
    single = fastadapt.evaluate(tmp_path / "alone", episodes=70, task_workers=1)
    seen.clear()
    again = fastadapt.evaluate(tmp_path / "alone", episodes=70, task_workers=2)  # `fastadapt eval --task-workers`
    assert seen == [2] and again["metrics"] == single["metrics"]
    # (eval scores the predictive probabilities in float64, the run's test its float32 logits: the same accuracy)
    assert again["mean"] == pytest.approx(alone["mean"], abs=1e-7)


@needs_omniglot
@pytest.mark.usefixtures("one_thread")  # the runs train on one thread; the count is restored after
def test_a_run_resumes_with_another_number_of_task_workers(tmp_path):
    whole = fastadapt.train(TINY, tmp_path / "whole", progress=False)
    cut = tmp_path / "cut"
    fastadapt.train(TINY, cut, progress=False)
    for f in (cut / "checkpoints").iterdir():  # as if killed just after the step-4 checkpoint
        if not f.name.startswith(step_name(4)):
            f.unlink()
    (cut / "results.json").unlink()
    resumed = fastadapt.train(out=cut, resume=True, task_workers=2, progress=False)
    assert resumed["config"]["task_workers"] == 2
    assert _same(_weights(cut, 6), _weights(tmp_path / "whole", 6))
    assert (resumed["mean"], resumed["steps"]) == (whole["mean"], 6)


@pytest.mark.parametrize("values, named", [
    (dict(algorithm="protonet"), "algorithm 'protonet' (maml, fomaml, metasgd, anil, maml++, imaml)"),
])
def test_task_workers_are_refused_where_they_cannot_apply(values, named):
    omniglot = dict(dataset="omniglot", backbone="conv4", task_workers=2)
    with pytest.raises(ConfigError, match="task_workers=2 trains tasks in threads; not with") as error:
        Config.from_dict({**omniglot, **values})
    assert named in str(error.value) and "Set task_workers: 1" in str(error.value)
    assert Config.from_dict({**omniglot, **values, "task_workers": 1}).task_workers == 1
    with pytest.raises(ConfigError, match="task_workers must be an integer >= 1, got 0"):
        Config.from_dict({**omniglot, "task_workers": 0})


def test_cli_flags_name_a_bad_worker_count_and_refuse_a_sinusoid_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--task-workers", "0", "--out", str(tmp_path / "a")])
    assert "argument --task-workers: expected an integer >= 1, got '0'" in capsys.readouterr().err
    assert main(["run", "--algo", "protonet", "--task-workers", "2", "--out", str(tmp_path / "b")]) == 2
    assert "algorithm 'protonet'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
