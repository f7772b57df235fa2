"""Several finished runs side by side: ``fedsim compare`` and :func:`load_run`.

A run folder (:mod:`fedsim.results`) holds everything needed: ``config.json``
says which dataset a run used, ``metrics.jsonl`` has its rounds. The task's
metric is the one ``metrics.png`` draws (:func:`fedsim.results.plotted_metrics`),
measured on the server's test set where the run has one (``central_*``), else
by the clients (``evaluate_*``). Runs on different datasets are refused unless
asked for: their accuracies are not comparable numbers.
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from fedsim import atomic
from fedsim.config import ConfigError
from fedsim.results import (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    holds_run,
    plotted_metrics,
    read_metrics,
)

# Metrics for which a higher value is better; every other plotted one (loss, mse,
# perplexity, Fréchet distance) is best at its lowest.
_HIGHER_IS_BETTER = frozenset({"accuracy"})
# One point of a curve: (round, wall-clock seconds since the run started, value).
Point = tuple[int, float, float]


class RunFolderError(ValueError):
    """A folder holds no run that fedsim can read; the message names it."""


class IncomparableRunsError(ValueError):
    """Runs on different datasets, compared without ``allow_different_datasets``."""


@dataclass(frozen=True)
class Run:
    """One run folder's results, as :func:`load_run` reads them.

    Attributes
    ----------
    path
        The run folder.
    config
        Its ``config.json``: the resolved config, as nested dicts.
    summary
        Its ``summary.json``; ``{}`` when a killed run never wrote one.
    rows
        Its ``metrics.jsonl``, one dict per round (round 0: the initial model).
    metrics
        The same rows as a ``pandas.DataFrame`` (one row per round, a ``round``
        column) when pandas is installed, else ``rows`` itself: pandas is optional.
    """

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    metrics: Any


def load_run(path: str | Path) -> Run:
    """Return the config, summary and per-round metrics of the run in ``path``.

    ``metrics`` is a ``pandas.DataFrame`` if pandas can be imported, else the list
    of row dicts (``rows``, always there). Raises :class:`RunFolderError`, one line
    naming the folder, when it holds no run or a file of it cannot be read.
    """
    folder = Path(path)
    if not folder.is_dir() or not holds_run(folder):
        raise RunFolderError(f"{folder}/ holds no fedsim run (no {CONFIG_FILE}, {METRICS_FILE})")
    for name in (CONFIG_FILE, METRICS_FILE):
        if not (folder / name).is_file():
            raise RunFolderError(f"{folder}/ holds part of a run: its {name} is missing")
    try:
        rows = read_metrics(folder / METRICS_FILE)
    except ConfigError as exc:  # a damaged line: the file is named in the message
        raise RunFolderError(str(exc)) from None
    config = _json_table(folder / CONFIG_FILE)
    summary = _json_table(folder / SUMMARY_FILE) if (folder / SUMMARY_FILE).exists() else {}
    return Run(folder, config, summary, rows, _as_frame(rows))


def _json_table(path: Path) -> dict[str, Any]:
    """Return the JSON object in ``path``; raise :class:`RunFolderError` if it is not one."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise RunFolderError(f"{path} is unreadable: {str(exc).splitlines()[0]}") from None
    if not isinstance(value, dict):
        raise RunFolderError(f"{path} is not a JSON object")
    return value


def _as_frame(rows: list[dict[str, Any]]) -> Any:
    """Return ``rows`` as a DataFrame when pandas is installed, else unchanged."""
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Curves:
    """What ``fedsim compare`` draws and tabulates of one run.

    ``metric`` is the task's (accuracy, mse, perplexity, ...); each curve holds
    the rounds that measured it, as :data:`Point` s. ``simulated`` is the
    simulated device time summed up to each round, empty without simulated devices.
    """

    label: str
    metric: str
    task: list[Point]
    loss: list[Point]
    epsilon: list[Point]
    simulated: list[Point]
    rounds: int
    wall_s: float | None


def curves_of(run: Run, label: str) -> Curves:
    """Return the curves of ``run``: its task metric and loss (central, else clients'), ε, time."""
    columns = {key for row in run.rows for key in row}
    metric, _ = plotted_metrics(columns)
    simulated: list[Point] = []
    if any(row.get("simulated_s") is not None for row in run.rows):
        total = 0.0  # from round 0, which simulates nothing
        for row in run.rows:
            total += row.get("simulated_s") or 0.0
            simulated.append(_point(row, total))
    last_elapsed = run.rows[-1].get("elapsed_s") if run.rows else None
    return Curves(
        label=label,
        metric=metric,
        task=_measured(run.rows, metric, columns),
        loss=_measured(run.rows, "loss", columns),
        epsilon=_column(run.rows, "privacy_epsilon"),
        simulated=simulated,
        rounds=max((int(row["round"]) for row in run.rows), default=0),
        wall_s=run.summary.get("wall_time_s", last_elapsed),
    )


def _measured(rows: list[dict[str, Any]], metric: str, columns: set[str]) -> list[Point]:
    """Return ``metric`` as the server measured it, else as the clients did."""
    for prefix in ("central_", "evaluate_"):
        if prefix + metric in columns:
            return _column(rows, prefix + metric)
    return []


def _column(rows: list[dict[str, Any]], column: str) -> list[Point]:
    return [_point(row, row[column]) for row in rows if row.get(column) is not None]


def _point(row: dict[str, Any], value: float) -> Point:
    return int(row["round"]), float(row.get("elapsed_s") or 0.0), float(value)


def check_same_dataset(runs: Sequence[Run]) -> None:
    """Raise :class:`IncomparableRunsError` unless every run used the first run's dataset."""
    first = runs[0]
    dataset = first.config.get("data", {}).get("dataset")
    for run in runs[1:]:
        other = run.config.get("data", {}).get("dataset")
        if other != dataset:
            raise IncomparableRunsError(
                f"{run.path}/ used data.dataset = {other!r} but {first.path}/ used "
                f"{dataset!r}; pass --allow-different-datasets to compare them anyway"
            )


def labels_of(runs: Sequence[Run]) -> list[str]:
    """Name each run by its folder's name, or by its path where two folders share a name."""
    names = [run.path.name for run in runs]
    return [str(run.path) if names.count(run.path.name) > 1 else run.path.name for run in runs]


def comparison_table(curves: Sequence[Curves]) -> Table:
    """Tabulate each run's final and best metric and loss, final ε, rounds and wall time."""
    metrics = {c.metric for c in curves}
    metric = metrics.pop() if len(metrics) == 1 else "metric"
    table = Table(title="fedsim compare")
    for header in ("run", "rounds", f"final {metric}", f"best {metric}", "final loss",
                   "best loss", "final ε", "wall time (s)"):  # fmt: skip
        table.add_column(header, justify="left" if header == "run" else "right")
    for c in curves:
        named = "" if metric == c.metric else f" {c.metric}"
        table.add_row(
            c.label,
            str(c.rounds),
            _number(final_value(c.task)) + named,
            _number(best_value(c.task, c.metric)) + named,
            _number(final_value(c.loss)),
            _number(best_value(c.loss, "loss")),
            _number(final_value(c.epsilon)),
            _number(c.wall_s, digits=2),
        )
    return table


def final_value(curve: list[Point]) -> float | None:
    """Return the curve's last value, ``None`` for an empty curve."""
    return curve[-1][2] if curve else None


def best_value(curve: list[Point], metric: str) -> float | None:
    """Return the curve's best value: the highest accuracy, the lowest of anything else."""
    values = [p[2] for p in curve if not math.isnan(p[2])]
    if not values:
        return None
    return max(values) if metric in _HIGHER_IS_BETTER else min(values)


def _number(value: float | None, *, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot_comparison(curves: Sequence[Curves], path: Path) -> None:
    """Draw every run's curves against rounds (top row) and wall time (bottom row).

    The panels are the task metric, the loss, and ε and the simulated time where
    any run has them; a run keeps its colour in each.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = sorted({c.metric for c in curves})
    panels = [(" / ".join(metrics), [c.task for c in curves]), ("loss", [c.loss for c in curves])]
    optional = [
        ("ε", [c.epsilon for c in curves]),
        ("simulated time (s)", [c.simulated for c in curves]),
    ]
    panels += [(name, per_run) for name, per_run in optional if any(per_run)]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 7.5), squeeze=False)
    lines = {}  # one legend entry per run, whichever panel drew it
    for row, x_label in enumerate(("round", "wall time (s)")):
        for ax, (name, per_run) in zip(axes[row], panels, strict=True):
            for i, (c, curve) in enumerate(zip(curves, per_run, strict=True)):
                if curve:
                    xs = [p[row] for p in curve]  # p[0]: round, p[1]: elapsed seconds
                    ys = [p[2] for p in curve]
                    color = f"C{i % 10}"
                    (lines[c.label],) = ax.plot(xs, ys, color=color, marker="o", markersize=3)
            if row == 0:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(x_label)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    columns = max(1, min(len(lines), 4))
    fig.legend(list(lines.values()), list(lines), loc="upper center", ncol=columns)
    legend_rows = -(-len(lines) // columns)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.035 * legend_rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as partial:
        fig.savefig(partial, dpi=120, format="png")
    plt.close(fig)


def compare_runs(
    paths: Sequence[str | Path], out: Path, *, allow_different_datasets: bool = False
) -> Table:
    """Load the runs in ``paths``, plot them into ``out`` and return their table.

    Raises :class:`RunFolderError` or :class:`IncomparableRunsError` before
    writing anything.
    """
    runs = [load_run(path) for path in paths]
    if not allow_different_datasets:
        check_same_dataset(runs)
    curves = [curves_of(run, label) for run, label in zip(runs, labels_of(runs), strict=True)]
    plot_comparison(curves, out)
    return comparison_table(curves)
