"""Calibration metrics against oracles and constructions, temperature scaling fitted on validation
episodes only, and calibration in `fastadapt eval` / `fastadapt calibrate`."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastadapt
from fastadapt.calibration import (adaptive_calibration_error, brier_scores, classification_summary,
                                   expected_calibration_error, fit_temperature, gaussian_crps, gaussian_nll,
                                   interval_coverage, maximum_calibration_error, nll_scores,
                                   probability_integral_transform, quantile_calibration_error, regression_summary)
from fastadapt.training.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_probs(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(n, classes, generator=generator, dtype=torch.float64), -1)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return probs, labels


@pytest.mark.parametrize("classes", [2, 5, 20])
def test_ece_mce_and_brier_equal_torchmetrics(classes):
    """torchmetrics computes in float32 and puts a confidence of exactly 1 in a 16th bin (ours: the
    last, Guo et al.'s (lower, upper] bins): compared on float32 inputs with no confidence on an edge."""
    tm = pytest.importorskip("torchmetrics.functional")
    probs, labels = _random_probs(3000, classes, seed=classes)
    probs = probs.float()
    edges = torch.linspace(0, 1, 16)
    assert not torch.isin(probs.max(1).values, edges).any()
    for norm, ours in (("l1", expected_calibration_error), ("max", maximum_calibration_error)):
        theirs = tm.classification.multiclass_calibration_error(probs, labels, num_classes=classes, n_bins=15, norm=norm)
        assert float(ours(probs, labels)) == pytest.approx(float(theirs), abs=1e-6)
    one_hot = torch.nn.functional.one_hot(labels, classes).double()
    brier = classes * tm.mean_squared_error(probs, one_hot)  # the multi-class Brier score: C x the MSE per entry
    assert float(brier_scores(probs, labels).mean()) == pytest.approx(float(brier), abs=1e-6)


def test_a_perfectly_calibrated_predictor_has_ece_below_one_percent():
    generator = torch.Generator().manual_seed(0)
    n, classes = 100_000, 5
    confidence = 0.2 + 0.8 * torch.rand(n, generator=generator, dtype=torch.float64)
    probs = torch.cat([confidence[:, None], ((1 - confidence) / 4)[:, None].expand(n, 4)], 1)
    right = torch.rand(n, generator=generator, dtype=torch.float64) < confidence  # right as often as it says
    labels = torch.where(right, 0, torch.randint(1, classes, (n,), generator=generator))
    assert float(expected_calibration_error(probs, labels)) <= 0.01
    assert float(adaptive_calibration_error(probs, labels)) <= 0.01


def test_a_constant_overconfident_predictor_has_the_ece_of_its_construction():
    n = 1500
    probs = torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64).expand(n, 3)
    labels = torch.tensor([0, 0, 0, 1, 1] * 300)  # says 90%, right 60% of the time (in every run of 100)
    for error in (expected_calibration_error, maximum_calibration_error, adaptive_calibration_error):
        assert float(error(probs, labels)) == pytest.approx(0.3, abs=1e-12)
    assert float(brier_scores(probs, labels).mean()) == pytest.approx(0.6 * (0.01 + 2 * 0.0025) + 0.4 * (0.81 + 0.9025 + 0.0025))
    assert float(nll_scores(probs, labels).mean()) == pytest.approx(-(0.6 * math.log(0.9) + 0.4 * math.log(0.05)))


def test_adaptive_ece_splits_as_numpy_array_split():
    probs, labels = _random_probs(1003, 4, seed=1)
    confidence, predicted = probs.max(1)
    order = np.argsort(confidence.numpy(), kind="stable")
    conf, right = confidence.numpy()[order], (predicted == labels).double().numpy()[order]
    by_hand = sum(abs(r.sum() - c.sum()) for c, r in zip(np.array_split(conf, 15), np.array_split(right, 15))) / 1003
    assert float(adaptive_calibration_error(probs, labels)) == pytest.approx(by_hand, abs=1e-12)


def test_bad_shapes_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"got probs \(4, 3\) and labels \(5,\)"):
        expected_calibration_error(torch.rand(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="stds must be > 0"):
        gaussian_nll(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2))


def test_gaussian_predictions_of_their_own_targets_are_calibrated():
    generator = torch.Generator().manual_seed(0)
    n = 100_000
    means = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    stds = 0.5 + torch.rand(n, 1, generator=generator, dtype=torch.float64)
    target = means[:, 0] + stds[:, 0] * torch.randn(n, generator=generator, dtype=torch.float64)
    pit = probability_integral_transform(means, stds, target)
    for level in (0.5, 0.9, 0.95):
        assert float(interval_coverage(pit, level).mean()) == pytest.approx(level, abs=0.005)
    assert float(quantile_calibration_error(pit)) <= 0.005
    # twice too narrow: the 90% interval covers P(|z| <= 1.645 / 2) = 59%
    narrow = probability_integral_transform(means, stds / 2, target)
    assert float(interval_coverage(narrow, 0.9).mean()) == pytest.approx(0.59, abs=0.01)


def test_crps_equals_its_integral_and_torchmetrics_ensemble_crps():
    means = torch.tensor([[0.3, -1.0], [2.0, 2.5]], dtype=torch.float64)
    stds = torch.tensor([[0.7, 0.4], [1.5, 0.2]], dtype=torch.float64)
    target = torch.tensor([0.1, 3.0], dtype=torch.float64)
    def cdf(x, row):
        return 0.5 * (1 + torch.erf((x[:, None] - means[row]) / (stds[row] * math.sqrt(2)))).mean(-1)

    integral = []  # F^2 below the target, (1 - F)^2 above it
    for row, y in enumerate(target.tolist()):
        below, above = torch.linspace(-20, y, 200_001, dtype=torch.float64), torch.linspace(y, 20, 200_001, dtype=torch.float64)
        integral.append(torch.trapezoid(cdf(below, row) ** 2, below) + torch.trapezoid((1 - cdf(above, row)) ** 2, above))
    integral = torch.stack(integral)
    assert torch.allclose(gaussian_crps(means, stds, target), integral, atol=1e-6)
    tm = pytest.importorskip("torchmetrics.functional.regression")
    generator = torch.Generator().manual_seed(0)
    component = torch.randint(0, 2, (2, 4000), generator=generator)
    draws = means.gather(1, component) + stds.gather(1, component) * torch.randn(2, 4000, generator=generator, dtype=torch.float64)
    theirs = tm.continuous_ranked_probability_score(draws, target)
    assert float(gaussian_crps(means, stds, target).mean()) == pytest.approx(float(theirs), abs=0.02)


def test_mixture_nll_is_the_log_of_the_mean_density():
    means, stds, y = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.5]]), torch.tensor([1.0])
    density = sum(torch.exp(-0.5 * ((y - m) / s) ** 2) / (s * math.sqrt(2 * math.pi)) for m, s in zip(means[0], stds[0])) / 2
    assert float(gaussian_nll(means, stds, y)) == pytest.approx(float(-density.log()), rel=1e-6)


def test_temperature_fitting_recovers_the_temperature_that_made_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(50_000, 5, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / 2.0, -1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits.unsqueeze(1), labels) == pytest.approx(2.0, rel=0.03)
    with pytest.raises(ValueError, match=r"samples must be \(N, S, C\)"):
        fit_temperature(logits, labels)


def test_summaries_pool_the_binned_errors_and_repeat_exactly():
    probs, labels = _random_probs(40 * 15, 5, seed=3)
    summary = classification_summary(probs.view(40, 15, 5), labels.view(40, 15), resamples=200)
    assert summary.estimates["ece"][0] == pytest.approx(float(expected_calibration_error(probs, labels)), abs=1e-12)
    assert summary.estimates["adaptive_ece"][0] == pytest.approx(float(adaptive_calibration_error(probs, labels)), abs=1e-12)
    assert summary.estimates["accuracy"][0] == pytest.approx(float((probs.argmax(1) == labels).double().mean()))
    assert all(ci > 0 for _, ci in summary.estimates.values())
    again = classification_summary(probs.view(40, 15, 5), labels.view(40, 15), resamples=200)
    assert again.estimates == summary.estimates
    assert sum(summary.extra["reliability"]["count"]) == 600
    means, stds = torch.zeros(10, 7, 1), torch.ones(10, 7, 1)
    regression = regression_summary(means, stds, torch.randn(10, 7, generator=torch.Generator().manual_seed(0)), resamples=50)
    assert {"loss", "mse", "crps", "picp50", "picp90", "picp95", "quantile_ce"} == set(regression.estimates)


# -- runs: temperature fitted on validation episodes only ------------------------------------------

def _bars(root: Path, classes: int, offset: int, seed: int, noise: bool = False) -> None:
    """Grey 28x28 images of `classes` classes: a bright bar at a class-specific place (or pure noise)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"bar{offset + c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(5):
            image = rng.integers(0, 256 if noise else 60, (28, 28), dtype=np.uint8)
            if not noise:
                row = (2 * (offset + c)) % 24
                image[row: row + 3, 3 + (offset + c) % 5: 22] = 255
            Image.fromarray(image, "L").save(folder / f"{i}.png")


def _images(root: Path) -> Path:
    _bars(root / "train", 8, 0, seed=0)
    _bars(root / "val", 4, 8, seed=1)
    _bars(root / "test", 4, 12, seed=2)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("calibration-run")
    images = _images(tmp / "images")
    out = tmp / "run"
    fastadapt.train({"algorithm": "protonet", "dataset": f"folder:{images}", "backbone": "conv4", "image_size": 28, "channels": 1,
                     "ways": 3, "shots": 1, "queries": 2, "eval_queries": 3, "iterations": 20, "meta_batch": 1,
                     "eval_episodes": 4, "threads": 1}, out, progress=False)
    return out


def test_temperature_is_fitted_on_validation_episodes_never_on_test_ones(run, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTADAPT_CACHE", str(tmp_path / "cache-clean"))
    fitted = fastadapt.calibrate(run, episodes=12)
    stored = json.loads((run / "calibration" / "temperature-3w1s-3q-0steps.json").read_text())
    assert stored == fitted and fitted["split"] == "validation" and fitted["episodes"] == 12
    assert fitted["validation"]["nll_after"] <= fitted["validation"]["nll_before"]
    clean = fastadapt.evaluate(run, episodes=12)
    # poison the test split (noise in place of every test image, read afresh): the fit is unchanged
    images = Path(json.loads((run / "config.json").read_text())["dataset"][len("folder:"):])
    _bars(images / "test", 4, 12, seed=9, noise=True)
    monkeypatch.setenv("FASTADAPT_CACHE", str(tmp_path / "cache-poisoned"))
    assert fastadapt.calibrate(run, episodes=12)["temperature"] == fitted["temperature"]
    poisoned = fastadapt.evaluate(run, episodes=12)
    assert poisoned["metrics"]["loss"]["mean"] != clean["metrics"]["loss"]["mean"]  # the poison reaches the test
    _images(images)  # restore the test split for the tests that follow
    monkeypatch.setenv("FASTADAPT_CACHE", str(tmp_path / "cache-restored"))


def test_eval_reports_calibration_and_applies_the_fitted_temperature(run, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTADAPT_CACHE", str(tmp_path / "cache"))
    plain = fastadapt.evaluate(run, episodes=10)
    assert {"accuracy", "loss", "brier", "ece", "mce", "adaptive_ece"} == set(plain["metrics"])
    assert plain["temperature"] is None and sum(plain["reliability"]["count"]) == 10 * 9
    fitted = fastadapt.calibrate(run, episodes=10)
    scaled = fastadapt.evaluate(run, episodes=10, calibrated=True)
    assert scaled["temperature"] == fitted["temperature"] != 1.0
    assert scaled["metrics"]["accuracy"] == plain["metrics"]["accuracy"]  # one model: the argmax is unchanged
    assert scaled["metrics"]["loss"]["mean"] != plain["metrics"]["loss"]["mean"]
    assert scaled["uncalibrated"] == plain["metrics"]  # from the same predictions
    assert len(list((run / "evals").glob("*-10ep-calibrated.json"))) == 1
    with pytest.raises(ConfigError, match=r"no temperature was fitted .* 3-way 2-shot.*fastadapt calibrate .* --shots 2"):
        fastadapt.evaluate(run, episodes=4, shots=2, calibrated=True)
    done = subprocess.run([sys.executable, "-m", "fastadapt.cli", "eval", str(run), "--episodes", "4", "--calibrated"],
                          capture_output=True, text=True, env={**__import__("os").environ,
                                                               "FASTADAPT_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert f"calibration, temperature {fitted['temperature']:.3f}: ece" in done.stdout and "nll" in done.stdout


def test_calibrate_refuses_a_run_without_a_validation_split(tmp_path):
    out = tmp_path / "run"
    fastadapt.train({"iterations": 2, "eval_episodes": 2, "meta_batch": 2, "threads": 1}, out, progress=False)
    with pytest.raises(ConfigError, match="calibrates class probabilities; .* is a regression run"):
        fastadapt.calibrate(out)
    images = tmp_path / "images"
    _bars(images / "train", 8, 0, seed=0)
    _bars(images / "test", 4, 12, seed=2)
    no_validation = tmp_path / "no-validation"
    fastadapt.train({"algorithm": "protonet", "dataset": f"folder:{images}", "backbone": "conv4", "image_size": 28, "channels": 1, "ways": 3,
                     "shots": 1, "queries": 2, "eval_queries": 3, "iterations": 2, "meta_batch": 1, "eval_episodes": 2,
                     "threads": 1},
                    no_validation, progress=False)
    with pytest.raises(ConfigError, match="this run has no validation split.*never on test ones: train with "
                                          "validation_characters > 0"):
        fastadapt.calibrate(no_validation)


def test_an_ensemble_of_classifiers_averages_probabilities():
    from fastadapt import EpisodeSampler, ProtoNet
    from fastadapt.data import ImageClassDataset
    from fastadapt.nn import Conv4
    from fastadapt.training.evaluate import evaluate_calibration, evaluate_ensemble

    torch.manual_seed(0)
    data = ImageClassDataset(torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8), torch.arange(40) // 4)
    tasks = EpisodeSampler(data, 3, 1, 2, seed=0)
    members = [ProtoNet(Conv4.omniglot(ways=None)) for _ in range(2)]
    batch = tasks.task_batch(0, 4)
    probs = torch.stack([torch.softmax(m.query_outputs(batch).double(), -1) for m in members]).mean(0)
    by_hand = -probs.gather(-1, batch.query_y.unsqueeze(-1)).log().mean()
    assert evaluate_ensemble(members, tasks, 4)["loss"].mean == pytest.approx(float(by_hand), rel=1e-5)
    summary = evaluate_calibration(members, tasks, 4, resamples=20)
    assert summary.estimates["loss"][0] == pytest.approx(float(by_hand), rel=1e-9)


def test_report_draws_reliability_diagrams_and_tabulates_calibration(run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from fastadapt.training.report import write_report

    monkeypatch.setenv("FASTADAPT_CACHE", str(tmp_path / "cache"))
    result = fastadapt.evaluate(run, episodes=6)
    files = write_report([run], tmp_path / "report")
    assert files.reliability is not None and files.reliability.stat().st_size > 10_000
    text = files.markdown.read_text()
    ece = result["metrics"]["ece"]
    assert "## Calibration" in text and f"{100 * ece['mean']:.2f} +- {100 * ece['ci95']:.2f}" in text
    assert "![reliability diagrams](reliability.png)" in text
    broken = json.loads(next((run / "evals").glob("*-6ep.json")).read_text())
    del broken["reliability"]["count"]
    (run / "evals" / "broken.json").write_text(json.dumps(broken))
    try:
        with pytest.raises(ValueError, match="broken.json: a calibrated evaluation needs reliability edges, count"):
            write_report([run], tmp_path / "report2")
    finally:
        (run / "evals" / "broken.json").unlink()


def test_a_deep_ensemble_of_runs_averages_their_probabilities(run, tmp_path, monkeypatch):
    from fastadapt.training.evaluate import evaluate_calibration
    from fastadapt.training.experiment import test_source

    monkeypatch.setenv("FASTADAPT_CACHE", str(tmp_path / "cache"))
    config = fastadapt.api.run_config(run)
    other = tmp_path / "seed1"
    fastadapt.train({**config.to_dict(), "seed": 1}, other, progress=False)
    result = fastadapt.evaluate(run, episodes=6, members=[other])
    assert result["members"] == [str(other)]
    by_hand = evaluate_calibration([fastadapt.load(run), fastadapt.load(other)], test_source(config), 6)
    assert result["metrics"]["loss"]["mean"] == pytest.approx(by_hand.estimates["loss"][0], rel=1e-12)
    single = fastadapt.evaluate(run, episodes=6)
    assert result["metrics"]["loss"]["mean"] != single["metrics"]["loss"]["mean"]
    regression = tmp_path / "regression"
    fastadapt.train({"iterations": 2, "eval_episodes": 2, "meta_batch": 2, "threads": 1}, regression, progress=False)
    with pytest.raises(ConfigError, match=r"ensemble member .*regression differs from the run in algorithm, dataset, backbone, ways"):
        fastadapt.evaluate(run, episodes=4, members=[regression])


def test_auroc_equals_the_mann_whitney_statistic_with_ties():
    from fastadapt.calibration.ood import auroc, auroc_ci95, predictive_entropy

    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    inside = torch.randint(0, 20, (300,), generator=generator).double()  # many ties
    outside = torch.randint(5, 30, (200,), generator=generator).double()
    u = stats.mannwhitneyu(outside.numpy(), inside.numpy()).statistic
    assert auroc(inside, outside) == pytest.approx(u / (300 * 200), abs=1e-12)
    assert auroc(inside, inside + 100) == 1.0 and auroc(inside, inside) == 0.5
    value, ci = auroc_ci95(inside, outside, resamples=100)
    assert value == auroc(inside, outside) and 0 < ci < 0.2
    assert float(predictive_entropy(torch.full((4,), 0.25))) == pytest.approx(math.log(4))


def test_gaussian_outputs_train_and_report_interval_calibration(tmp_path):
    from fastadapt.algorithms.objectives import gaussian_parameters, predictive_mean, task_loss

    output, target = torch.tensor([[0.5, -1.0], [2.0, 0.3]]), torch.tensor([[0.0], [1.0]])
    mean, std = gaussian_parameters(output)
    expected = torch.nn.functional.gaussian_nll_loss(mean, target, std ** 2, full=True)
    assert float(task_loss("gaussian", output, target)) == pytest.approx(float(expected), rel=1e-6)
    # moment matching: the mixture of N(0, 1) and N(2, 1) is mean 1, variance 2
    raw_one = math.log(math.expm1(1 - 1e-3))
    samples = torch.tensor([[0.0, raw_one], [2.0, raw_one]], dtype=torch.float64)
    m, s = gaussian_parameters(predictive_mean("gaussian", samples, 0))
    assert float(m) == pytest.approx(1.0) and float(s) == pytest.approx(math.sqrt(2.0), rel=1e-6)
    run = tmp_path / "run"
    fastadapt.train({"likelihood": "gaussian", "shots": 5, "queries": 5, "eval_queries": 10, "iterations": 300,
                     "meta_batch": 10, "eval_episodes": 20, "threads": 1}, run, progress=False)
    result = fastadapt.evaluate(run, episodes=50)
    assert result["metric"] == "mse" and result["mean"] == result["metrics"]["mse"]["mean"]
    assert {"loss", "mse", "crps", "picp50", "picp90", "picp95", "quantile_ce"} == set(result["metrics"])
    assert 0.5 < result["metrics"]["picp90"]["mean"] <= 1.0 and sum(result["pit_histogram"]) == 50 * 10
    assert len(result["bands"]) == 4 and len(result["bands"][0]["means"]) == 1 and len(result["bands"][0]["x"]) == 100
    if importlib.util.find_spec("matplotlib"):
        from fastadapt.training.report import write_report

        files = write_report([run], tmp_path / "report")
        assert files.bands is not None and files.bands.stat().st_size > 10_000 and files.reliability is None
        text = files.markdown.read_text()
        picp = result["metrics"]["picp90"]
        assert "## Regression with uncertainty" in text and f"{picp['mean']:.4f} +- {picp['ci95']:.4f}" in text
    with pytest.raises(ConfigError, match="likelihood 'gaussian' is a regression output"):
        fastadapt.train({"likelihood": "gaussian", "dataset": "omniglot", "backbone": "conv4"}, tmp_path / "x")


def test_sines_and_lines_tasks_are_both_kinds_and_repeat():
    from fastadapt.data.registry import get_tasksets

    tasks = get_tasksets("sines-lines", ways=1, shots=2, queries=50).test
    batch = tasks.task_batch(0, 40)
    assert torch.equal(batch.query_y, tasks.task_batch(0, 40).query_y)
    residuals = []
    for t in range(40):  # a line fits a line's points to the noise (0.3); a sine's it does not
        x, y = batch.query_x[t, :, 0].double(), batch.query_y[t, :, 0].double()
        design = torch.stack([x, torch.ones_like(x)], 1)
        coefficients = torch.linalg.lstsq(design, y.unsqueeze(1)).solution
        residuals.append(float((design @ coefficients - y.unsqueeze(1)).std()))
    lines = sum(r < 0.4 for r in residuals)
    assert 10 <= lines <= 30


def test_ood_scores_another_datasets_tasks_by_predictive_entropy(run, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTADAPT_CACHE", str(tmp_path / "cache"))
    noise = tmp_path / "noise"
    _bars(noise / "train", 8, 0, seed=5, noise=True)
    _bars(noise / "test", 4, 8, seed=6, noise=True)
    found = fastadapt.detect_ood(run, against=f"folder:{noise}", episodes=12)
    assert found["episodes"] == 12 and 0.0 <= found["auroc"] <= 1.0 and found["ci95"] >= 0
    assert found["entropy"]["in"]["mean"] >= 0 and (run / "ood").is_dir()
    assert fastadapt.detect_ood(run, against=f"folder:{noise}", episodes=12) == found  # the same numbers twice
    fitted = fastadapt.calibrate(run, episodes=6)
    assert fastadapt.detect_ood(run, against=f"folder:{noise}", episodes=4, calibrated=True)["temperature"] == \
        fitted["temperature"]
