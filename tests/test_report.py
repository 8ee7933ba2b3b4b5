"""`fastadapt report`: plots and a Markdown table from hand-written run directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from fastadapt.training.report import (
    MATPLOTLIB_MISSING,
    ReportFiles,
    inner_steps_series,
    load_run,
    shots_series,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEADER = "step,phase,loss,accuracy,lr,tasks_per_s,elapsed_s"


def _metrics(classification: bool, header: str = HEADER) -> str:
    lines = [header]
    for step in (10, 20, 30, 40):
        loss = 2.0 / step
        acc = f"{0.5 + step / 100:.3f}" if classification else ""
        lines.append(f"{step},train,{loss:.4f},{acc},0.001,120.5,{step * 0.1:.1f}")
        if step % 20 == 0:
            lines.append(f"{step},validation,{loss * 1.1:.4f},{acc},,,{step * 0.1:.1f}")
    return "\n".join(lines) + "\n"


def _make_run(root: Path, folder: str, config: dict[str, Any], *, results: dict[str, Any] | None,
              evals: list[dict[str, Any]] = (), metrics: str | None = None) -> Path:
    run = root / folder
    (run / "evals").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    classification = config["dataset"] != "sinusoid"
    (run / "metrics.csv").write_text(metrics if metrics is not None else _metrics(classification))
    if results is not None:
        (run / "results.json").write_text(json.dumps(results))
    for i, e in enumerate(evals):
        (run / "evals" / f"eval_{i}.json").write_text(json.dumps(e))
    return run


def _results(metric: str, mean: float, ci95: float, **extra: Any) -> dict[str, Any]:
    return {"metric": metric, "mean": mean, "ci95": ci95, "episodes": 1000, "seed": 0, "config": {},
            "wall_time_s": 83.25, "train_time_s": 80.0, "tasks_per_s": 412.34,
            "metrics": {metric: {"mean": mean, "ci95": ci95}}, "versions": {}, **extra}


def _eval(shots: int, steps: int | None, mean: float, ways: int = 5, dataset: str = "omniglot",
          metric: str = "accuracy") -> dict[str, Any]:
    return {"dataset": dataset, "ways": ways, "shots": shots, "inner_steps": steps, "episodes": 200,
            "metric": metric, "mean": mean, "ci95": 0.01}


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    maml = _make_run(tmp_path, "run_maml", {
        "algorithm": "maml", "dataset": "omniglot", "ways": 5, "shots": 1, "inner_steps": 1,
        "eval_inner_steps": None, "seed": 0, "name": "maml-5w1s"},
        results=_results("accuracy", 0.9808, 0.0021),
        evals=[_eval(1, 1, 0.95), _eval(1, 3, 0.97), _eval(1, 5, 0.975), _eval(5, 3, 0.99),
               _eval(1, 3, 0.5, ways=20)])  # another way count: in neither plot
    protonet = _make_run(tmp_path, "run_protonet", {
        "algorithm": "protonet", "dataset": "omniglot", "ways": 5, "shots": 1, "seed": 0, "name": None,
        "inner_steps": 1},  # the trainer's config keeps a default inner_steps even for protonet
        results=_results("accuracy", 0.97, 0.0035),
        evals=[_eval(1, None, 0.97), _eval(5, None, 0.99), _eval(1, 1, 0.96)])
    sinusoid = _make_run(tmp_path, "run_sine", {
        "algorithm": "maml", "dataset": "sinusoid", "ways": 1, "shots": 10, "inner_steps": 1, "seed": 1,
        "name": "sine"},
        results=_results("mse", 0.01234, 0.00056))
    unfinished = _make_run(tmp_path, "run_unfinished", {
        "algorithm": "fomaml", "dataset": "omniglot", "ways": 5, "shots": 1, "inner_steps": 1, "seed": 2,
        "name": "still-going"},
        results=None)
    return [maml, protonet, sinusoid, unfinished]


def _table_rows(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]  # skip the header


def test_report_writes_plots_and_table(runs: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    files = write_report(runs, out)
    assert isinstance(files, ReportFiles)
    assert [p.name for p in files.paths] == [
        "report.md", "learning_curves.png", "accuracy_vs_inner_steps.png", "accuracy_vs_shots.png"]
    for png in files.paths[1:]:
        data = png.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), png
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files.paths)  # no temp files left

    markdown = files.markdown.read_text()
    rows = _table_rows(markdown)
    assert [r[0] for r in rows] == ["maml-5w1s", "run_protonet", "sine", "still-going"]  # order given
    assert rows[0] == ["maml-5w1s", "maml", "omniglot", "5", "1", "accuracy", "98.08 +- 0.21", "1000",
                       "1 min 23 s", "412.3"]
    assert rows[1][1] == "protonet" and rows[1][6] == "97.00 +- 0.35"
    assert rows[2][2] == "sinusoid" and rows[2][5:7] == ["mse", "0.0123 +- 0.0006"]
    assert rows[3][5:7] == ["unfinished", "unfinished"]
    for png in files.paths[1:]:
        assert f"]({png.name})" in markdown


def test_report_order_follows_arguments(runs: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    files = write_report(list(reversed(runs)), tmp_path / "out")
    names = [r[0] for r in _table_rows(files.markdown.read_text())]
    assert names == ["still-going", "sine", "run_protonet", "maml-5w1s"]


def test_eval_series_use_the_runs_own_ways_and_shots(runs: list[Path]) -> None:
    maml, protonet, sinusoid, _ = (load_run(r) for r in runs)
    steps = inner_steps_series(maml)
    assert steps is not None and steps.x == (1.0, 3.0, 5.0)
    assert steps.y == pytest.approx((95.0, 97.0, 97.5)) and steps.err == pytest.approx((1.0, 1.0, 1.0))
    shots = shots_series(maml)
    assert shots is not None and shots.x == (1.0, 5.0)
    assert shots.y == pytest.approx((95.0, 99.0))  # at 1 shot: the run's own 1 inner step, not 3 or 5
    assert inner_steps_series(protonet) is None  # no inner loop
    assert shots_series(protonet) is not None and shots_series(protonet).x == (1.0, 5.0)
    assert inner_steps_series(sinusoid) is None and shots_series(sinusoid) is None  # no evals


def test_eval_series_leave_out_evaluations_with_another_query_count_or_an_ensemble(tmp_path: Path) -> None:
    other_queries = {**_eval(1, 3, 0.99), "queries": 1}  # `fastadapt eval --queries 1`: another protocol
    ensemble = {**_eval(1, 5, 0.99), "ensemble": 5}  # `fastadapt eval --ensemble 5`: another model
    run = load_run(_make_run(tmp_path, "run", {
        "algorithm": "maml", "dataset": "omniglot", "ways": 5, "shots": 1, "inner_steps": 1, "eval_queries": 15,
        "seed": 0, "name": None}, results=_results("accuracy", 0.95, 0.01),
        evals=[_eval(1, 3, 0.97), {**_eval(1, 5, 0.975), "queries": 15, "ensemble": 1}, other_queries, ensemble]))
    steps = inner_steps_series(run)
    assert steps is not None and steps.x == (3.0, 5.0) and steps.y == pytest.approx((97.0, 97.5))


def test_plots_without_evaluations_still_written(runs: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    files = write_report([runs[2], runs[3]], tmp_path / "out")  # no evals anywhere
    for png in (files.accuracy_vs_inner_steps, files.accuracy_vs_shots):
        assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_missing_run_dir_raises_and_writes_nothing(runs: list[Path], tmp_path: Path) -> None:
    missing = tmp_path / "no_such_run"
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no_such_run"):
        write_report([runs[0], missing], out)
    assert not out.exists()


def test_run_dir_without_config_raises(tmp_path: Path) -> None:
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ValueError, match=r"empty_run.*config\.json"):
        write_report([tmp_path / "empty_run"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_metrics_without_loss_column_raises(runs: list[Path], tmp_path: Path) -> None:
    bad = _make_run(tmp_path, "run_bad", {"algorithm": "maml", "dataset": "omniglot", "ways": 5, "shots": 1},
                    results=None, metrics="step,phase,accuracy,lr,tasks_per_s,elapsed_s\n1,train,0.5,0.001,10,1\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"metrics\.csv.*'loss'"):
        write_report([runs[0], bad], out)
    assert not out.exists()


def test_missing_matplotlib_message(runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ImportError, match=r"pip install 'fastadapt\[report\]'") as info:
        write_report(runs, tmp_path / "out")
    assert str(info.value) == MATPLOTLIB_MISSING
    assert not (tmp_path / "out").exists()
