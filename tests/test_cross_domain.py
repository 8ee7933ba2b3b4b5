"""Any dataset from the command line, and cross-domain evaluation: a run trained on one dataset,
tested on another's test split (`fastadapt eval RUN --dataset NAME`, `fastadapt.evaluate(dataset=)`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fastadapt
from fastadapt.cli import main
from test_datasets import REAL_MNIST, _tiny_mini_imagenet


def _cli(*args: str, env_data: Path | None = None, cache: Path | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    if env_data is not None:
        env["FASTADAPT_DATA"] = str(env_data)
    if cache is not None:
        env["FASTADAPT_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "fastadapt.cli", *args], capture_output=True, text=True, env=env)


def _glyphs(root: Path, classes: int = 15, per_class: int = 6, size: int = 32) -> Path:
    """A folder of grey images, one sub-folder per class: a bright bar at a class-specific place."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"glyph{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 40, (size, size), dtype=np.uint8)
            row = 1 + 2 * c
            image[row: row + 3, 4: size - 4] = 255
            Image.fromarray(image, "L").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A ProtoNet trained on a folder dataset at 28x28 grey: (run directory, cache)."""
    tmp = tmp_path_factory.mktemp("folder-run")
    images = _glyphs(tmp / "glyphs")
    cache = tmp / "cache"
    done = _cli("run", "--algo", "protonet", "--dataset", f"folder:{images}", "--image-size", "28", "--channels", "1",
                "--ways", "3", "--train-ways", "3", "--shots", "1", "--queries", "2", "--eval-queries", "2",
                "--iterations", "20", "--eval-episodes", "20", "--threads", "1", "--out", str(tmp / "run"), cache=cache)
    assert done.returncode == 0, done.stderr
    return tmp / "run", cache


def test_a_folder_dataset_trains_and_tests_from_the_command_line(folder_run) -> None:
    run, _ = folder_run
    result = json.loads((run / "results.json").read_text())
    assert result["config"]["dataset"].startswith("folder:") and result["config"]["image_size"] == 28
    assert result["metric"] == "accuracy" and result["episodes"] == 20
    assert result["mean"] > 0.5  # 3-way: chance is 1/3, the bars are easy


@pytest.mark.skipif(REAL_MNIST is None, reason="the real MNIST files are not here (../shared/data/mnist)")
def test_a_folder_run_is_evaluated_on_mnist(folder_run, monkeypatch) -> None:
    run, cache = folder_run
    done = _cli("eval", str(run), "--dataset", "mnist", "--ways", "5", "--episodes", "10", env_data=REAL_MNIST,
                cache=cache)
    assert done.returncode == 0, done.stderr
    assert "5-way 1-shot on mnist: accuracy" in done.stdout
    written = json.loads((run / "evals" / "mnist-5w1s-0steps-10ep.json").read_text())
    assert written["dataset"] == "mnist" and written["trained_on"].startswith("folder:")
    monkeypatch.setenv("FASTADAPT_DATA", str(REAL_MNIST))
    monkeypatch.setenv("FASTADAPT_CACHE", str(cache))
    again = fastadapt.evaluate(run, dataset="mnist", ways=5, episodes=10)  # the same fixed episodes
    assert again["mean"] == written["mean"]


def test_cross_domain_errors_name_the_shapes_and_kinds(folder_run, tmp_path: Path) -> None:
    run, cache = folder_run
    _tiny_mini_imagenet(tmp_path)
    done = _cli("eval", str(run), "--dataset", "mini-imagenet", "--episodes", "4", env_data=tmp_path, cache=cache)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert ("takes inputs of shape 1x28x28 (trained on 'folder:" in done.stderr
            and "'mini-imagenet' gives 3x28x28" in done.stderr)  # decoded at the run's size, but RGB
    done = _cli("eval", str(run), "--dataset", "mnst", "--episodes", "4")
    assert done.returncode == 2 and "unknown dataset 'mnst' (did you mean 'mnist'?)" in done.stderr


def test_a_regression_run_cannot_be_tested_on_images(tmp_path: Path, capsys) -> None:
    main(["run", "--iterations", "5", "--eval-episodes", "4", "--out", str(tmp_path / "sine")])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "sine"), "--dataset", "mnist", "--episodes", "4"]) == 2
    assert "a regression run on 'sinusoid' cannot be tested on 'mnist'" in capsys.readouterr().err


@pytest.mark.skipif(REAL_MNIST is None, reason="the real MNIST files are not here (../shared/data/mnist)")
def test_mnist_trains_and_tests_from_the_command_line(tmp_path: Path) -> None:
    done = _cli("run", "--algo", "protonet", "--dataset", "mnist", "--train-ways", "5", "--iterations", "10",
                "--eval-episodes", "20", "--threads", "1", "--out", str(tmp_path / "run"), env_data=REAL_MNIST)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["config"]["dataset"] == "mnist" and result["mean"] > 0.4  # 5-way digits: chance 0.2


def test_load_returns_the_trained_learner_ready_to_evaluate(folder_run, monkeypatch) -> None:
    from fastadapt.api import run_config
    from fastadapt.training import evaluate_learner
    from fastadapt.training.experiment import test_source

    run, cache = folder_run
    monkeypatch.setenv("FASTADAPT_CACHE", str(cache))
    learner = fastadapt.load(run)
    assert isinstance(learner, fastadapt.ProtoNet)
    result = json.loads((run / "results.json").read_text())
    estimate = evaluate_learner(learner, test_source(run_config(run)), result["episodes"])["accuracy"]
    assert estimate.mean == pytest.approx(result["mean"], abs=1e-12)
