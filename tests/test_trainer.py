"""The trainer: exact resume after SIGKILL, checkpoint integrity, determinism, recipes, eval."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import fastadapt
from fastadapt.training.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, step_name,
                                          load_module_tensors, save_checkpoint)
from fastadapt.training.config import Config, ConfigError
from fastadapt.training.recipes import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMALL = dict(iterations=60, log_every=10, checkpoint_every=20, validation_every=20, validation_episodes=20,
             eval_episodes=30, meta_batch=5)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastadapt.cli", *args], capture_output=True, text=True, **kw)


def _metric_rows(run: Path) -> list[tuple]:
    with open(run / "metrics.csv") as f:
        return [(r["step"], r["phase"], r["loss"], r["accuracy"]) for r in csv.DictReader(f)]


def _results_numbers(run: Path) -> dict:
    r = json.loads((run / "results.json").read_text())
    return {k: r[k] for k in ("mean", "ci95", "episodes", "metrics", "steps", "best_step")}


def test_resume_after_sigkill_ends_exactly_like_an_uninterrupted_run(tmp_path):
    sets = ["--set", "iterations=4000", "--set", "log_every=100", "--set", "checkpoint_every=250",
            "--set", "validation_every=500", "--set", "validation_episodes=20", "--set", "eval_episodes=50",
            "--set", "threads=1"]
    recipe = str(RECIPES / "maml" / "sinusoid-5shot.yaml")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = _cli("train", recipe, "--out", str(whole), *sets, timeout=600)
    assert done.returncode == 0, done.stderr
    process = subprocess.Popen([sys.executable, "-m", "fastadapt.cli", "train", recipe, "--out", str(killed), *sets],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("step-000001*.json")) and time.time() < deadline:
        time.sleep(0.02)  # kill once the run is past step 1000, mid-way between checkpoints
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    resumed = _cli("train", "--resume", str(killed), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _results_numbers(killed) == _results_numbers(whole)
    assert _metric_rows(killed) == _metric_rows(whole)
    for name in ("best.json", "step-000004000.json"):
        a, _ = load_checkpoint(whole / "checkpoints" / name)
        b, _ = load_checkpoint(killed / "checkpoints" / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if k.startswith(("learner.", "optimizer.")))


def _run_cut_after_step_40(run: Path) -> dict:
    """A finished one-thread SMALL run, then its files as if killed just after the step-40 checkpoint."""
    whole = fastadapt.train({**SMALL, "threads": 1}, run, progress=False)
    for f in (run / "checkpoints").iterdir():
        if not f.name.startswith(step_name(40)):
            f.unlink()
    (run / "results.json").unlink()
    return whole


def test_a_run_resumes_with_another_thread_count(tmp_path):
    run = tmp_path / "run"
    whole = _run_cut_after_step_40(run)
    before = torch.get_num_threads()
    try:
        resumed = fastadapt.train(out=run, resume=True, threads=2, progress=False)
    finally:
        torch.set_num_threads(before)  # the trainer sets the process's thread count
    assert resumed["mean"] == pytest.approx(whole["mean"], rel=1e-4)  # threads may round differently
    assert resumed["steps"] == whole["steps"] == 60


def test_a_run_made_before_a_config_key_existed_resumes_and_a_changed_key_is_named(tmp_path):
    run = tmp_path / "run"
    whole = _run_cut_after_step_40(run)
    manifest = run / "checkpoints" / f"{step_name(40)}.json"
    for path, inside in ((run / "config.json", lambda d: d), (manifest, lambda d: d["state"]["config"])):
        saved = json.loads(path.read_text())
        del inside(saved)["inner_state"]  # a key the library gained after the run was made
        path.write_text(json.dumps(saved))
    resumed = fastadapt.train(out=run, resume=True, progress=False)
    assert resumed["mean"] == whole["mean"] and resumed["steps"] == 60
    saved = json.loads(manifest.read_text())
    saved["state"]["config"]["inner_lr"] = 0.5
    manifest.write_text(json.dumps(saved))
    for f in (run / "checkpoints").iterdir():  # back to the edited step-40 checkpoint
        if not f.name.startswith(step_name(40)):
            f.unlink()
    with pytest.raises(ConfigError, match=r"made with other settings \(inner_lr\)"):
        fastadapt.train(out=run, resume=True, progress=False)


def test_a_saved_config_with_a_key_this_version_does_not_know_names_the_file(tmp_path):
    run = tmp_path / "run"
    _run_cut_after_step_40(run)
    manifest = run / "checkpoints" / f"{step_name(40)}.json"
    saved = json.loads(manifest.read_text())
    saved["state"]["config"]["inner_schedule"] = "cosine"  # a key from another version
    manifest.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=rf"{step_name(40)}.json holds a config this version .*'inner_schedule'"):
        fastadapt.train(out=run, resume=True, progress=False)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "inner_schedule": "cosine"}))
    with pytest.raises(ConfigError, match=r"config.json holds a config this version .*'inner_schedule'"):
        fastadapt.api.run_config(run)


def test_an_evaluation_with_another_query_count_gets_its_own_file(tmp_path):
    run = tmp_path / "run"
    fastadapt.train({**SMALL, "validation_every": 0, "threads": 1}, run, progress=False)
    own = fastadapt.evaluate(run, episodes=4)
    other = fastadapt.evaluate(run, episodes=4, queries=3)
    files = {p.name: json.loads(p.read_text()) for p in (run / "evals").glob("*.json")}
    assert own["queries"] == Config().eval_queries and other["queries"] == 3
    assert sorted(files) == ["sinusoid-5w10s-1steps-4ep.json", "sinusoid-5w10s-3q-1steps-4ep.json"]
    assert files["sinusoid-5w10s-3q-1steps-4ep.json"]["mean"] == other["mean"] != own["mean"]


def test_same_seed_same_results_and_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        runs[name] = fastadapt.train({**SMALL, "seed": seed}, tmp_path / name, progress=False)
    same = ("mean", "ci95", "metrics", "best_step")
    assert {k: runs["a"][k] for k in same} == {k: runs["b"][k] for k in same}
    assert runs["a"]["mean"] != runs["c"]["mean"]


def test_truncated_checkpoint_is_reported_and_the_previous_good_one_used(tmp_path):
    run = tmp_path / "run"
    fastadapt.train({**SMALL, "validation_every": 0}, run, progress=False)
    newest = sorted((run / "checkpoints").glob("step-*.safetensors"))[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or was modified"):
        load_checkpoint(newest.with_suffix(".json"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, state, used = latest_checkpoint(run / "checkpoints")
    assert used.name == "step-000000040.json" and state["step"] == 40
    assert any("skipping a bad checkpoint" in str(w.message) for w in caught)


def test_tampered_manifest_and_wrong_shapes_give_clear_errors(tmp_path):
    run = tmp_path / "run"
    fastadapt.train({**SMALL, "validation_every": 0}, run, progress=False)
    manifest = sorted((run / "checkpoints").glob("step-*.json"))[-1]
    manifest.write_text(manifest.read_text()[:50])
    with pytest.raises(CheckpointError, match="truncated or not JSON"):
        load_checkpoint(manifest)
    learner = fastadapt.MAML(torch.nn.Linear(1, 3), task="regression")
    tensors = {"learner.model.weight": torch.zeros(2, 1), "learner.model.bias": torch.zeros(3)}
    path = save_checkpoint(tmp_path / "ck", "odd", tensors, {})
    loaded, _ = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"'model.weight' has shape \(2, 1\), the model expects \(3, 1\)"):
        load_module_tensors(learner, loaded, "learner.", path)


def test_eval_command_other_shots_and_inner_steps(tmp_path):
    run = tmp_path / "run"
    fastadapt.train({**SMALL, "validation_every": 0}, run, progress=False)
    done = _cli("eval", str(run), "--episodes", "20", "--shots", "5", "--inner-steps", "1", "3")
    assert done.returncode == 0, done.stderr
    assert "5-shot, 1 inner step: mse" in done.stdout and "5-shot, 3 inner steps: mse" in done.stdout
    files = sorted(p.name for p in (run / "evals").glob("*.json"))
    assert files == ["sinusoid-5w5s-1steps-20ep.json", "sinusoid-5w5s-3steps-20ep.json"]


def test_eval_of_a_corrupt_run_is_one_clear_line(tmp_path):
    run = tmp_path / "run"
    fastadapt.train({**SMALL, "validation_every": 0}, run, progress=False)
    for f in (run / "checkpoints").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    done = _cli("eval", str(run), "--episodes", "10")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "truncated or was modified" in done.stderr


def test_a_finished_run_directory_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    fastadapt.train({**SMALL, "validation_every": 0}, run, progress=False)
    before = (run / "results.json").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        fastadapt.train({**SMALL, "validation_every": 0, "seed": 9}, run, progress=False)
    assert (run / "results.json").read_bytes() == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("shotz=3", "unknown config key 'shotz' (did you mean 'shots'?)"),
        ("shots=three", "shots must be an integer >= 1, got 'three' (str)"),
        ("shots=0", "shots must be an integer >= 1, got 0"),
        ("shots=2.0", "shots must be an integer >= 1, got 2.0 (float)"),
        ("algorithm=mama", "algorithm must be one of maml, fomaml, metasgd, anil, protonet, imaml, baseline, maml++, "
                           "reptile, matchingnet, vampire, platipus, bmaml; got 'mama'"),
        ("meta_lr=-1", "meta_lr must be a number > 0, got -1 (int)"),
        ("validation_characters=0", "validation_every > 0 on omniglot needs validation_characters > 0"),
        ("precision=fp16", "precision must be one of fp32, bf16; got 'fp16'"),
        ("compile=yes please", "compile must be true or false, got 'yes please' (str)"),
        ("cg_steps=3", "cg_steps=3 applies to algorithm 'imaml', not 'maml'; leave it at its default (cg_steps: 5)"),
    ],
)
def test_recipe_errors_name_the_key_without_a_traceback(override, message, tmp_path):
    done = _cli("train", str(RECIPES / "maml" / "omniglot-5w1s.yaml"), "--set", override, "--out", str(tmp_path / "r"))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()


def test_missing_data_root_is_a_clear_error(tmp_path):
    done = _cli("train", str(RECIPES / "protonet" / "omniglot-5w1s.yaml"), "--set",
                f"data_root={tmp_path / 'nowhere'}", "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(tmp_path / "nowhere" / "omniglot") in done.stderr and "FASTADAPT_DATA" in done.stderr


def test_every_shipped_recipe_is_valid_and_covers_the_matrix():
    recipes = sorted(RECIPES.glob("*/*.yaml"))
    configs = [load_recipe(p) for p in recipes]
    for algo in ("maml", "fomaml", "metasgd", "anil", "protonet"):
        for ways, shots in ((5, 1), (5, 5), (20, 1), (20, 5)):
            assert any(c.algorithm == algo and c.dataset == "omniglot" and (c.ways, c.shots) == (ways, shots) for c in configs)
        if algo != "protonet":
            for shots in (5, 10):
                assert any(c.algorithm == algo and c.dataset == "sinusoid" and c.shots == shots for c in configs)


def test_config_round_trip_and_type_checks():
    config = Config.from_dict({"shots": 5, "meta_lr": 1})
    assert config.meta_lr == 1.0 and Config.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="train_ways=20 differs from ways=5"):
        Config.from_dict({"dataset": "omniglot", "backbone": "conv4", "train_ways": 20})


def test_tensorboard_event_files_when_asked(tmp_path):
    pytest.importorskip("tensorboard")
    fastadapt.train({**SMALL, "validation_every": 0, "tensorboard": True}, tmp_path / "run", progress=False)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    with pytest.raises(ConfigError, match="tensorboard must be true or false, got 'yes'"):
        Config.from_dict({"tensorboard": "yes"})


def test_early_stopping_after_validations_without_improvement(tmp_path):
    # a learning rate too small to change float32 weights: every validation equals the first
    results = fastadapt.train({**SMALL, "iterations": 500, "validation_every": 10, "early_stopping": 2,
                               "optimizer": "sgd", "meta_lr": 1e-30}, tmp_path / "run", progress=False)
    assert results["stopped_early"] and results["steps"] == 30 and results["best_step"] == 10
    rows = _metric_rows(tmp_path / "run")
    assert [r[0] for r in rows if r[1] == "validation"] == ["10", "20", "30"]


def test_learning_rate_schedules():
    from fastadapt.training.trainer import learning_rate

    cosine = Config(schedule="cosine", meta_lr=1.0, iterations=100)
    assert learning_rate(cosine, 1) == 1.0 and abs(learning_rate(cosine, 51) - 0.5) < 1e-12
    assert learning_rate(Config(meta_lr=0.3), 77) == 0.3


def test_a_diverging_run_stops_at_the_step_that_diverged_and_keeps_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    # Adam at meta_lr 1e30: step 1's loss is finite, its update is not
    proc = _cli("run", "--iterations", "6", "--meta-batch", "2", "--eval-episodes", "2", "--threads", "1",
                "--meta-lr", "1e30", "--log-every", "1", "--checkpoint-every", "1", "--out", str(run))
    assert proc.returncode == 1, proc.stderr
    assert "training diverged: the meta-loss is nan at outer step 2" in proc.stderr
    assert "(the newest: step-000000001.json), but resuming repeats the divergence" in proc.stderr
    assert "Traceback" not in proc.stderr
    tensors, state, _ = latest_checkpoint(run / "checkpoints")
    assert state["step"] == 1 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["1"] and not (run / "results.json").exists()


def test_meta_train_names_the_step_whose_loss_is_not_finite():
    from fastadapt import MAML, SinusoidTasks
    from fastadapt.nn import MLP
    from fastadapt.training import meta_train
    from fastadapt.training.loop import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="nan at outer step 1"):
        meta_train(MAML(MLP(), 1e20, task="regression"), SinusoidTasks(), iterations=4, meta_batch=2, log_every=2)


def test_weights_that_are_not_finite_stop_the_run_even_after_a_finite_loss(tmp_path):
    from fastadapt.training.loop import TrainingDiverged
    from fastadapt.training.trainer import Trainer

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    trainer = Trainer(Config(), tmp_path)
    with pytest.raises(TrainingDiverged, match="the weights are not finite after outer step 7. No checkpoint"):
        trainer._check_finite(model, {"meta_loss": [torch.tensor(0.5)]}, 7)
