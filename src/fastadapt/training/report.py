"""Plots and a Markdown comparison table from finished runs (behind `fastadapt report`).

A run directory holds `config.json`, `metrics.csv`, `results.json` once the run finished, and
`evals/*.json` from later `fastadapt eval` calls. `write_report` reads and checks every run first,
then writes `learning_curves.png`, `accuracy_vs_inner_steps.png`, `accuracy_vs_shots.png`,
`robustness.png` (when a run holds `robustness/*.json` from `fastadapt robustness`),
`reliability.png` (when a run holds classification evaluations, which record calibration),
`predictive_bands.png` (when a run holds evaluations of a Gaussian-output regressor) and `report.md`
into the output folder, each file atomically. Plotting needs matplotlib (the `report`
extra); importing this module does not.

Example:
    >>> from pathlib import Path
    >>> files = write_report([Path("runs/maml"), Path("runs/protonet")], Path("runs/report"))  # doctest: +SKIP
    >>> files.markdown.name  # doctest: +SKIP
    'report.md'
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..io import atomic_path
from .calibration_report import CalibrationResult, calibration_table, plot_bands, plot_reliability, read_calibration
from .robustness_report import RobustnessResult, plot_robustness, read_robustness, robustness_table
from .trainer import METRIC_COLUMNS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "MATPLOTLIB_MISSING",
    "EvalPoint",
    "ReportFiles",
    "RunData",
    "Series",
    "load_run",
    "inner_steps_series",
    "shots_series",
    "markdown_report",
    "write_report",
]

MATPLOTLIB_MISSING = "fastadapt report needs matplotlib: pip install 'fastadapt[report]'"
_EVAL_KEYS = ("ways", "shots", "metric", "mean", "ci95")
_RESULT_KEYS = ("metric", "mean", "ci95")
_NO_INNER_STEPS = "no evaluations at several inner steps: run `fastadapt eval RUN --inner-steps S`"
_NO_SHOTS = "no evaluations at several shots: run `fastadapt eval RUN --shots K`"


@dataclass(frozen=True)
class ReportFiles:
    """The files `write_report` wrote.

    Example:
        >>> files = ReportFiles(Path("r/report.md"), Path("r/lc.png"), Path("r/is.png"), Path("r/sh.png"))
        >>> [p.name for p in files.paths]
        ['report.md', 'lc.png', 'is.png', 'sh.png']
    """

    markdown: Path
    learning_curves: Path
    accuracy_vs_inner_steps: Path
    accuracy_vs_shots: Path
    robustness: Path | None = None  # written when a run holds robustness results
    reliability: Path | None = None  # written when a run holds classification evaluations with reliability bins
    bands: Path | None = None  # written when a run holds evaluations of a Gaussian-output regressor

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every file written, the Markdown report first."""
        written = (self.markdown, self.learning_curves, self.accuracy_vs_inner_steps, self.accuracy_vs_shots)
        return written + tuple(p for p in (self.robustness, self.reliability, self.bands) if p is not None)


@dataclass(frozen=True)
class EvalPoint:
    """One `evals/*.json` file of a run."""

    path: Path
    dataset: str | None
    ways: int | None
    shots: int | None
    inner_steps: int | None
    episodes: int | None
    metric: str
    mean: float
    ci95: float
    queries: int | None = None  # absent in evaluations written before it was recorded
    ensemble: int = 1  # checkpoints averaged (`fastadapt eval --ensemble`); absent before ensembles existed


@dataclass(frozen=True)
class RunData:
    """Everything read from one run directory; `rows` are the parsed lines of metrics.csv.

    Example:
        >>> run = load_run(Path("runs/maml"))  # doctest: +SKIP
        >>> run.name, run.finished  # doctest: +SKIP
        ('maml', True)
    """

    path: Path
    name: str
    config: dict[str, Any]
    rows: tuple[dict[str, Any], ...]
    results: dict[str, Any] | None
    evals: tuple[EvalPoint, ...] = field(default=())
    robustness: tuple[RobustnessResult, ...] = field(default=())
    calibration: tuple[CalibrationResult, ...] = field(default=())

    @property
    def finished(self) -> bool:
        return self.results is not None

    @property
    def algorithm(self) -> str | None:
        return self.config.get("algorithm", self.config.get("algo"))

    @property
    def dataset(self) -> str | None:
        return self.config.get("dataset")

    @property
    def metric(self) -> str:
        """'accuracy' or 'mse': from results.json, else from what metrics.csv logged."""
        if self.results is not None:
            return str(self.results["metric"])
        if any(not math.isnan(row["accuracy"]) for row in self.rows):
            return "accuracy"
        return "mse" if self.dataset == "sinusoid" else "loss"

    @property
    def has_inner_loop(self) -> bool:
        """False for ProtoNet, MatchingNet and Baseline (whose configs may still carry a default `inner_steps`)."""
        return self.algorithm not in ("protonet", "baseline", "matchingnet") and self.config.get("inner_steps") is not None

    @property
    def test_inner_steps(self) -> int | None:
        """Inner steps of the run's own test evaluation (None without an inner loop)."""
        if not self.has_inner_loop:
            return None
        steps = self.config.get("eval_inner_steps") or self.config.get("inner_steps")
        return None if steps is None else int(steps)


@dataclass(frozen=True)
class Series:
    """One line of a plot: `y` in display units (accuracy in percent)."""

    name: str
    metric: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    err: tuple[float, ...] = ()


# ---------------------------------------------------------------------------------------------
# Reading and checking run directories
# ---------------------------------------------------------------------------------------------


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read {what}: {error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: {what} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def _number(value: Any, path: Path, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}: {key!r} must be a number, got {value!r}")
    return float(value)


def _optional_int(value: Any, path: Path, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{path}: {key!r} must be an integer or null, got {value!r}")
    return value


def _read_metrics(path: Path) -> tuple[dict[str, Any], ...]:
    """Parses metrics.csv; empty cells become NaN (numbers) or stay '' (phase)."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise ValueError(f"{path}: empty file, expected the header {','.join(METRIC_COLUMNS)}")
            header = [name.strip() for name in header]
            reader.fieldnames = header
            for column in METRIC_COLUMNS:
                if column not in header:
                    raise ValueError(f"{path}: missing column {column!r} (header: {','.join(header)})")
            rows = []
            for row in reader:
                parsed: dict[str, Any] = {"phase": (row["phase"] or "").strip()}
                for column in METRIC_COLUMNS:
                    if column == "phase":
                        continue
                    text = (row[column] or "").strip()
                    try:
                        parsed[column] = float(text) if text else math.nan
                    except ValueError:
                        raise ValueError(f"{path}: line {reader.line_num}: column {column!r} is not a number: "
                                         f"{text!r}") from None
                rows.append(parsed)
    except OSError as error:
        raise ValueError(f"{path}: cannot read metrics.csv: {error}") from None
    return tuple(rows)


def _read_eval(path: Path) -> EvalPoint:
    data = _read_json_object(path, "evaluation")
    for key in _EVAL_KEYS:
        if key not in data:
            raise ValueError(f"{path}: evaluation lacks the key {key!r}")
    return EvalPoint(
        path=path,
        dataset=data.get("dataset"),
        ways=_optional_int(data["ways"], path, "ways"),
        shots=_optional_int(data["shots"], path, "shots"),
        inner_steps=_optional_int(data.get("inner_steps"), path, "inner_steps"),
        episodes=_optional_int(data.get("episodes"), path, "episodes"),
        metric=str(data["metric"]),
        mean=_number(data["mean"], path, "mean"),
        ci95=_number(data["ci95"], path, "ci95"),
        queries=_optional_int(data.get("queries"), path, "queries"),
        ensemble=_optional_int(data.get("ensemble", 1), path, "ensemble") or 1,
    )


def load_run(path: Path) -> RunData:
    """Reads and checks one run directory; raises ValueError naming the path and what is wrong.

    Only config.json is required: a run without metrics.csv has no curves, one without
    results.json is reported as unfinished.

    Example:
        >>> load_run(Path("no/such/run"))
        Traceback (most recent call last):
        ...
        ValueError: run directory no/such/run does not exist
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"run directory {path} is not a directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"run directory {path} lacks config.json")
    config = _read_json_object(config_path, "config.json")
    metrics_path = path / "metrics.csv"
    rows = _read_metrics(metrics_path) if metrics_path.is_file() else ()
    results: dict[str, Any] | None = None
    results_path = path / "results.json"
    if results_path.is_file():
        results = _read_json_object(results_path, "results.json")
        for key in _RESULT_KEYS:
            if key not in results:
                raise ValueError(f"{results_path}: results.json lacks the key {key!r}")
        _number(results["mean"], results_path, "mean")
        _number(results["ci95"], results_path, "ci95")
    evals = tuple(_read_eval(p) for p in sorted((path / "evals").glob("*.json")))
    name = str(config.get("name") or path.resolve().name)
    return RunData(path=path, name=name, config=config, rows=rows, results=results, evals=evals,
                   robustness=tuple(read_robustness(path, name)), calibration=tuple(read_calibration(path, name)))


# ---------------------------------------------------------------------------------------------
# Series for the plots
# ---------------------------------------------------------------------------------------------


def _display(metric: str, value: float) -> float:
    return 100.0 * value if metric == "accuracy" else value


def _matches(point: EvalPoint, run: RunData, *, shots: bool) -> bool:
    if point.dataset is not None and run.dataset is not None and point.dataset != run.dataset:
        return False
    if point.ways != run.config.get("ways"):
        return False
    if point.queries is not None and point.queries != run.config.get("eval_queries", point.queries):
        return False  # another query count (`fastadapt eval --queries`) is another protocol
    if point.ensemble != 1:
        return False  # an ensemble of checkpoints is another model than the run's best
    return not shots or point.shots == run.config.get("shots")


def _pick(points: list[EvalPoint], preferred_steps: int | None) -> EvalPoint:
    """Among evaluations at one x: the run's own test inner steps first, then most episodes, then the last file."""
    return max(enumerate(points), key=lambda ip: (ip[1].inner_steps == preferred_steps, ip[1].episodes or 0, ip[0]))[1]


def _series(run: RunData, groups: dict[int, list[EvalPoint]], preferred_steps: int | None) -> Series | None:
    if not groups:
        return None
    chosen = [(x, _pick(groups[x], preferred_steps)) for x in sorted(groups)]
    metric = chosen[-1][1].metric
    chosen = [(x, p) for x, p in chosen if p.metric == metric]
    return Series(run.name, metric, tuple(float(x) for x, _ in chosen),
                  tuple(_display(metric, p.mean) for _, p in chosen),
                  tuple(_display(metric, p.ci95) for _, p in chosen))


def inner_steps_series(run: RunData) -> Series | None:
    """The run's evaluations with its own ways and shots against inner steps; None if it has none
    (or no inner loop, as ProtoNet).

    Example:
        >>> inner_steps_series(load_run(Path("runs/maml"))).x  # doctest: +SKIP
        (1.0, 3.0, 5.0)
    """
    if not run.has_inner_loop:
        return None
    groups: dict[int, list[EvalPoint]] = {}
    for point in run.evals:
        if point.inner_steps is not None and _matches(point, run, shots=True):
            groups.setdefault(point.inner_steps, []).append(point)
    return _series(run, groups, None)


def shots_series(run: RunData) -> Series | None:
    """The run's evaluations with its own ways against shots; None if it has none.

    Example:
        >>> shots_series(load_run(Path("runs/maml"))).x  # doctest: +SKIP
        (1.0, 5.0)
    """
    groups: dict[int, list[EvalPoint]] = {}
    for point in run.evals:
        if point.shots is not None and _matches(point, run, shots=False):
            groups.setdefault(point.shots, []).append(point)
    return _series(run, groups, run.test_inner_steps)


def _curve(run: RunData, phase: str, column: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    points = [(row["step"], row[column]) for row in run.rows
              if row["phase"] == phase and not math.isnan(row["step"]) and not math.isnan(row[column])]
    return tuple(p[0] for p in points), tuple(p[1] for p in points)


def _learning_series(run: RunData) -> tuple[Series | None, Series | None]:
    steps, loss = _curve(run, "train", "loss")
    train = Series(run.name, "loss", steps, loss) if steps else None
    if run.metric == "accuracy":
        steps, acc = _curve(run, "validation", "accuracy")
        validation = Series(run.name, "accuracy", steps, tuple(100.0 * a for a in acc)) if steps else None
    else:
        steps, mse = _curve(run, "validation", "loss")
        validation = Series(run.name, run.metric, steps, mse) if steps else None
    return train, validation


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _axis_label(metric: str) -> str:
    return {"accuracy": "accuracy (%)", "mse": "MSE", "loss": "loss"}.get(metric, metric)


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_lines(ax: Axes, series: list[tuple[int, Series]], xlabel: str, *, error_bars: bool,
                log_loss: bool = False) -> None:
    """Plots series on `ax`; a second metric (say MSE beside accuracy) goes on a twin y axis, dashed."""
    metrics: list[str] = []
    for _, s in series:
        if s.metric not in metrics:
            metrics.append(s.metric)
    axes = {metrics[0]: ax}
    if len(metrics) > 1:
        axes[metrics[1]] = ax.twinx()
    for extra in metrics[2:]:  # more than two kinds of metric: share the twin axis
        axes[extra] = axes[metrics[1]]
    handles, labels = [], []
    for index, s in series:
        target = axes[s.metric]
        style = dict(color=f"C{index % 10}", linestyle="-" if target is ax else "--", label=s.name)
        if error_bars:
            line = target.errorbar(s.x, s.y, yerr=s.err, marker="o", capsize=3, markersize=4, **style)
        else:
            (line,) = target.plot(s.x, s.y, marker="." if len(s.x) < 50 else None, **style)
        handles.append(line)
        labels.append(s.name if target is ax or len(axes) == 1 else f"{s.name} ({_axis_label(s.metric)}, right)")
    for target in {id(t): t for t in axes.values()}.values():
        shown = [m for m in metrics if axes[m] is target]
        target.set_ylabel(" / ".join(_axis_label(m) for m in shown))
        values = [y for _, s in series if s.metric in shown for y in s.y]
        if log_loss and all(m in ("loss", "mse") for m in shown) and values and min(values) > 0:
            target.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)
    ax.legend(handles, labels, fontsize=8, loc="best")


def _new_figure(width: float, height: float) -> Figure:
    # A bare Figure renders with the Agg canvas on savefig: no pyplot, so the caller's backend and
    # global figure list are left alone.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _learning_curves(runs: Sequence[RunData], path: Path) -> None:
    fig = _new_figure(11.0, 4.2)
    train_ax, val_ax = fig.subplots(1, 2)
    train, validation = [], []
    for index, run in enumerate(runs):
        t, v = _learning_series(run)
        if t is not None:
            train.append((index, t))
        if v is not None:
            validation.append((index, v))
    train_ax.set_title("training loss")
    if train:
        _plot_lines(train_ax, train, "step", error_bars=False, log_loss=True)
    else:
        _note(train_ax, "no training rows in metrics.csv")
    val_ax.set_title("validation")
    if validation:
        _plot_lines(val_ax, validation, "step", error_bars=False, log_loss=True)
    else:
        _note(val_ax, "no validation rows in metrics.csv")
    _save(fig, path)


def _eval_plot(runs: Sequence[RunData], path: Path, make: Callable[[RunData], Series | None], xlabel: str, title: str, note: str) -> None:
    fig = _new_figure(7.0, 4.5)
    ax = fig.subplots()
    ax.set_title(title)
    series = [(i, s) for i, s in ((i, make(run)) for i, run in enumerate(runs)) if s is not None]
    if series:
        _plot_lines(ax, series, xlabel, error_bars=True)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        _note(ax, note)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _wall_time(seconds: Any) -> str:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _mean_ci(metric: str, mean: float, ci95: float) -> str:
    if metric == "accuracy":
        return f"{100 * mean:.2f} +- {100 * ci95:.2f}"
    return f"{mean:.4f} +- {ci95:.4f}"


def _table_row(run: RunData) -> list[str]:
    config = run.config
    ways = None if run.dataset == "sinusoid" else config.get("ways")  # regression has no classes
    head = [_cell(run.name), _cell(run.algorithm), _cell(run.dataset), _cell(ways), _cell(config.get("shots"))]
    if run.results is None:
        return head + ["unfinished", "unfinished", "-", "-", "-"]
    r = run.results
    metric = str(r["metric"])
    rate = r.get("tasks_per_s")
    return head + [
        _cell(metric),
        _mean_ci(metric, float(r["mean"]), float(r["ci95"])),
        _cell(r.get("episodes")),
        _wall_time(r.get("wall_time_s")),
        f"{rate:.1f}" if isinstance(rate, (int, float)) and not isinstance(rate, bool) else "-",
    ]


def markdown_report(runs: Sequence[RunData], images: Sequence[tuple[str, str]] = ()) -> str:
    """The comparison table, one row per run in the order given, then `(title, file)` image links.

    Accuracy is shown in percent with 2 decimals, MSE with 4; a run without results.json reads
    "unfinished".

    Example:
        >>> run = RunData(Path("r"), "r", {"algorithm": "maml", "dataset": "omniglot", "ways": 5, "shots": 1}, (),
        ...               {"metric": "accuracy", "mean": 0.9808, "ci95": 0.0021, "episodes": 1000})
        >>> "| r | maml | omniglot | 5 | 1 | accuracy | 98.08 +- 0.21 | 1000 |" in markdown_report([run])
        True
    """
    header = ["run", "algorithm", "dataset", "ways", "shots", "metric", "mean +- 95% CI", "episodes", "wall time", "tasks/s"]
    lines = ["# fastadapt report", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_table_row(run)) + " |" for run in runs]
    robustness = robustness_table([result for run in runs for result in run.robustness])
    if robustness:
        lines += ["", *robustness]
    calibration = calibration_table([result for run in runs for result in run.calibration])
    if calibration:
        lines += ["", *calibration]
    if images:
        lines += ["", "## Plots", ""]
        for title, file in images:
            lines += [f"![{title}]({file})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def write_report(run_dirs: Sequence[Path], out_dir: Path) -> ReportFiles:
    """Reads every run in `run_dirs`, then writes the three plots and report.md into `out_dir`.

    All inputs are checked before anything is written: a missing run directory or config.json, or
    a metrics.csv without one of METRIC_COLUMNS, raises ValueError and leaves `out_dir` untouched.
    Raises ImportError if matplotlib is not installed.

    Example:
        >>> files = write_report([Path("runs/maml"), Path("runs/sinusoid")], Path("runs/report"))  # doctest: +SKIP
        >>> sorted(p.name for p in files.paths)  # doctest: +SKIP
        ['accuracy_vs_inner_steps.png', 'accuracy_vs_shots.png', 'learning_curves.png', 'report.md']
    """
    if isinstance(run_dirs, (str, Path)):
        raise TypeError("run_dirs must be a sequence of paths, not a single path")
    if not run_dirs:
        raise ValueError("no run directories given")
    runs = [load_run(Path(d)) for d in run_dirs]
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(MATPLOTLIB_MISSING) from error

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        markdown=out_dir / "report.md",
        learning_curves=out_dir / "learning_curves.png",
        accuracy_vs_inner_steps=out_dir / "accuracy_vs_inner_steps.png",
        accuracy_vs_shots=out_dir / "accuracy_vs_shots.png",
    )
    _learning_curves(runs, files.learning_curves)
    _eval_plot(runs, files.accuracy_vs_inner_steps, inner_steps_series, "inner steps at test time",
               "metric vs inner steps (run's own ways and shots)", _NO_INNER_STEPS)
    _eval_plot(runs, files.accuracy_vs_shots, shots_series, "shots (support examples per class)",
               "metric vs shots (run's own ways)", _NO_SHOTS)
    images = [("learning curves", files.learning_curves.name),
              ("metric vs inner steps", files.accuracy_vs_inner_steps.name),
              ("metric vs shots", files.accuracy_vs_shots.name)]
    if plot_robustness([result for run in runs for result in run.robustness], out_dir / "robustness.png"):
        files = dataclasses.replace(files, robustness=out_dir / "robustness.png")
        images.append(("robustness", "robustness.png"))
    if plot_reliability([result for run in runs for result in run.calibration], out_dir / "reliability.png"):
        files = dataclasses.replace(files, reliability=out_dir / "reliability.png")
        images.append(("reliability diagrams", "reliability.png"))
    if plot_bands([result for run in runs for result in run.calibration], out_dir / "predictive_bands.png"):
        files = dataclasses.replace(files, bands=out_dir / "predictive_bands.png")
        images.append(("predictive samples and 90% bands", "predictive_bands.png"))
    with atomic_path(files.markdown) as tmp:
        tmp.write_text(markdown_report(runs, images))
    return files
