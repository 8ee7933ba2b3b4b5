"""The command line: the embedded default's output and results.json, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastadapt.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastadapt.cli", *args], capture_output=True, text=True)


def test_run_on_sinusoid_writes_results_json(tmp_path, capsys):
    main(["run", "--iterations", "30", "--eval-episodes", "20", "--seed", "3", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "pre-adaptation mse" in printed and "post-adaptation mse" in printed
    assert "95% CI over 20 episodes" in printed
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["metric"] == "mse" and result["episodes"] == 20 and result["seed"] == 3
    assert result["config"]["algorithm"] == "maml" and result["config"]["dataset"] == "sinusoid"
    assert result["ci95"] > 0 and result["wall_time_s"] > 0
    assert set(result["metrics"]) == {"loss", "loss_before"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shots", "0"], "argument --shots: expected an integer >= 1, got '0'"),
        (["--inner-lr", "abc"], "argument --inner-lr: expected a number > 0, got 'abc'"),
        (["--algo", "mama"], "argument --algo: invalid choice: 'mama'"),
        (["--eval-episodes", "1"], "argument --eval-episodes: expected an integer >= 2, got '1'"),
        (["--dataset", "omniglott"], "argument --dataset: unknown dataset 'omniglott' (did you mean 'omniglot'?)"),
        (["--channels", "2"], "argument --channels: invalid choice: 2 (choose from 1, 3)"),
        (["--imaml-lambda", "3"], "imaml_lambda=3.0 applies to algorithm 'imaml', not 'maml'"),
        (["--algo", "protonet"], "algorithm 'protonet' needs a classification dataset"),
        (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
        (["--backbone", "conv4-strided"], "backbone 'conv4-strided' does not fit dataset 'sinusoid'; use backbone: mlp"),
    ],
)
def test_bad_flags_give_one_clear_line(args, message, tmp_path):
    done = _run("run", "--out", str(tmp_path), *args)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "results.json").exists()


def test_missing_omniglot_names_the_path_and_the_fix(tmp_path):
    done = _run("run", "--dataset", "omniglot", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert str(tmp_path / "nowhere" / "omniglot") in done.stderr
    assert "FASTADAPT_DATA" in done.stderr


def test_bf16_run_records_its_precision_and_ends_near_the_fp32_run(tmp_path, capsys):
    results = {}
    for precision in ("fp32", "bf16"):
        main(["run", "--iterations", "100", "--eval-episodes", "20", "--precision", precision,
              "--out", str(tmp_path / precision)])
        results[precision] = json.loads((tmp_path / precision / "results.json").read_text())
    assert results["bf16"]["config"]["precision"] == "bf16" and results["fp32"]["config"]["precision"] == "fp32"
    assert results["bf16"]["mean"] != results["fp32"]["mean"]  # really another computation
    assert abs(results["bf16"]["mean"] - results["fp32"]["mean"]) < 0.1 * results["fp32"]["mean"]
