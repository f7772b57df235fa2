"""A run's results on disk: per-round metrics, a summary and a plot.

``metrics.jsonl`` gets one line per round as soon as the round ends (flushed),
so a run that crashes or is interrupted keeps everything it computed; the
summary says how the run ended. A run folder's results are never replaced by
accident: a new run refuses a folder that holds one unless told to overwrite it,
and even then touches nothing until its first round has ended. Every other file
is replaced whole (:mod:`fedsim.atomic`), so a process killed at any point leaves
each of them complete or absent, and at most a cut-short last line of metrics.
"""

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from fedsim import atomic
from fedsim.checkpoint import CheckpointError, RunCheckpoint
from fedsim.config import ConfigError, RunConfig
from fedsim.loop import RoundReport

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
PLOT_FILE = "metrics.png"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
# fedsim's own files in a run folder: any one of them means the folder holds a run,
# and replacing a run removes exactly these (a user's own files there stay).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, PLOT_FILE, MODEL_FILE, CHECKPOINT_FILE)
# Settings a resumed run may change: how long it runs, how it shows progress, where it logs.
_RESUMABLE_CHANGES = {"rounds", "progress", "plot", "logging"}


class _NewRunCheckpoint(RunCheckpoint):
    """A new run's checkpoint: saved like any other, never restored.

    Until the new run's first round ends, its folder still holds the run it
    replaces, checkpoint included, which it must not continue.
    """

    def restore(self, strategy: object, grid: object) -> None:
        """Restore nothing: a new run starts from round 0."""


def checkpoint_of(config: RunConfig, *, resume: bool) -> RunCheckpoint | None:
    """Return the run's checkpoint file (``resume``: one it continues), or ``None`` when off."""
    if not config.checkpoint_every:
        return None
    kind = RunCheckpoint if resume else _NewRunCheckpoint
    return kind(config.run_dir / CHECKPOINT_FILE, every=config.checkpoint_every)


def holds_run(run_dir: Path) -> bool:
    """Return whether ``run_dir`` holds a run: any of ``RUN_FILES``, even a partial one."""
    return any((run_dir / name).exists() for name in RUN_FILES)


def check_run_folder(config: RunConfig, *, resume: bool, overwrite: bool) -> int | None:
    """Return the round a resumed run continues after (``None``: a new run), or raise.

    A new run stops with ``ConfigError`` before any work when its folder already
    holds a run (:func:`holds_run`), unless ``overwrite``: finished results are
    replaced only when asked. ``resume`` checks the saved run (:func:`check_resumable`).
    """
    if resume and overwrite:
        raise ConfigError(
            "--resume and --overwrite exclude each other: continue a run or replace it"
        )
    if resume:
        return check_resumable(config)
    if not overwrite and holds_run(config.run_dir):
        raise ConfigError(
            f"{config.run_dir}/ already holds a run; pass --resume to continue it "
            "or --overwrite to replace it"
        )
    return None


def check_resumable(config: RunConfig) -> int:
    """Return the last saved round of ``config``'s run; raise ``ConfigError`` if it cannot resume.

    The saved run must have the same settings (``rounds`` may grow: a resumed run
    can also extend a finished one).
    """
    checkpoint = checkpoint_of(config, resume=True)
    try:
        saved = checkpoint.load() if checkpoint is not None else None
    except CheckpointError as exc:
        raise ConfigError(f"cannot resume {config.run_dir}/: {exc}") from None
    if saved is None:
        raise ConfigError(f"nothing to resume: no {CHECKPOINT_FILE} in {config.run_dir}/")
    for name in (CONFIG_FILE, METRICS_FILE):
        if not (config.run_dir / name).exists():
            raise ConfigError(f"cannot resume {config.run_dir}/: its {name} is missing")
    before = _saved_config(config.run_dir / CONFIG_FILE)
    now = json.loads(json.dumps(asdict(config)))
    changed = sorted(
        key
        for key in set(before) | set(now)
        if key not in _RESUMABLE_CHANGES and before.get(key) != now.get(key)
    )
    if changed:
        raise ConfigError(
            f"cannot resume {config.run_dir}/ with other settings ({', '.join(changed)} "
            "differ); only rounds, progress, plot and logging may change"
        )
    read_metrics(config.run_dir / METRICS_FILE)  # a line cut short midway: refused here
    # model.pt is the last file a run writes: without it, a run killed after its last
    # checkpoint (writing its summary or model) resumes to write them.
    finished = (config.run_dir / MODEL_FILE).exists()
    if saved.round > config.rounds or (saved.round == config.rounds and finished):
        raise ConfigError(
            f"the run already has {saved.round} rounds; set rounds > {saved.round} to extend it"
        )
    return saved.round


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Return the rows of a ``metrics.jsonl``; raise ``ConfigError`` if one is not JSON.

    A last line that does not parse is what a process killed while appending it
    leaves: that round is dropped, as the round in flight is. Anywhere else, the
    file was damaged otherwise, and that is one line naming it.
    """
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break
            raise ConfigError(f"{path} line {number} is not JSON: {line[:40]!r}") from None
    return rows


def _saved_config(path: Path) -> dict[str, Any]:
    """Return a run's saved ``config.json``; raise ``ConfigError`` if it is not a JSON table."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        what = f"its {path.name} is unreadable ({reason})"
        raise ConfigError(f"cannot resume {path.parent}/: {what}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"cannot resume {path.parent}/: its {path.name} is not a JSON table")
    return saved


class RunRecorder:
    """Write ``runs/<name>/``: config.json, metrics.jsonl, summary.json, metrics.png.

    Nothing is written until the run's first new round has ended (round 0, the
    initial model's evaluation, is held in memory): a run that fails to start (bad
    data, an engine that cannot run a round) leaves its folder as it was. Then a
    new run removes the previous run's ``RUN_FILES`` (other files stay), and a
    resumed one drops the rounds after its checkpoint.
    """

    def __init__(self, config: RunConfig, *, resume_after: int | None = None) -> None:
        self.config = config
        self.run_dir = config.run_dir
        self._resume_after = resume_after
        self.rows: list[dict[str, Any]] = []
        if resume_after is not None:
            # Rounds after the checkpoint (the interrupted one's partial work) are dropped.
            rows = read_metrics(self.run_dir / METRICS_FILE)
            self.rows = [row for row in rows if row["round"] <= resume_after]
        self._metrics: TextIO | None = None  # open once the run has started
        self._started = time.perf_counter()

    def on_round(self, report: RoundReport) -> None:
        """Keep the round's row; once the run has started, append it to ``metrics.jsonl``."""
        row = report.as_row()
        self.rows.append(row)
        if self._metrics is None:
            if report.round == 0:  # the initial model's evaluation: the grid has run nothing yet
                return
            self._metrics = self._take_folder()  # every row so far, this one included
        else:
            self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def _take_folder(self) -> TextIO:
        """Make the folder this run's; return its metrics file, holding every row so far.

        A resumed run removes its summary and model: they describe a run that has
        moved on, and they are written again when it ends.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stale = RUN_FILES if self._resume_after is None else (SUMMARY_FILE, MODEL_FILE)
        # The checkpoint first (RUN_FILES ends with it): a run killed midway leaves
        # nothing to resume rather than a checkpoint without its config.
        for name in reversed(stale):
            (self.run_dir / name).unlink(missing_ok=True)
        atomic.remove_partials(self.run_dir, RUN_FILES)  # left by a killed run
        atomic.write_text(
            self.run_dir / CONFIG_FILE, json.dumps(asdict(self.config), indent=2) + "\n"
        )
        rows = "".join(json.dumps(row) + "\n" for row in self.rows)
        atomic.write_text(self.run_dir / METRICS_FILE, rows)  # a killed line's tail goes
        return (self.run_dir / METRICS_FILE).open("a")

    def finish(self, status: str, **extra: Any) -> dict[str, Any]:
        """Close the metrics file, write the summary (and plot); return the summary.

        A run that never started writes nothing: its folder stays as it was.
        """
        last_central: dict[str, Any] = next(
            (r for r in reversed(self.rows) if {"central_loss", "central_accuracy"} & r.keys()), {}
        )
        summary = {
            "name": self.config.name,
            "status": status,
            "rounds": max((int(r["round"]) for r in self.rows), default=0),
            "accuracy": last_central.get("central_accuracy"),
            "loss": last_central.get("central_loss"),
            "best_accuracy": max(
                (r["central_accuracy"] for r in self.rows if "central_accuracy" in r), default=None
            ),
            # The other tasks' headline metrics (fedsim.clients.training.TASK_METRICS).
            "perplexity": _last(self.rows, "central_perplexity"),
            "mse": _last(self.rows, "central_mse"),
            "failures": sum(int(r.get("failures", 0)) for r in self.rows),
            "failures_by_kind": _failures_by_kind(self.rows),
            "unavailable": sum(int(r.get("unavailable", 0)) for r in self.rows),
            "late": sum(int(r.get("late", 0)) for r in self.rows),
            "simulated_time_s": _total(r.get("simulated_s") for r in self.rows),
            "epsilon": _last(self.rows, "privacy_epsilon"),
            # GS-WGAN reports its paper's accounting beside the guarantee (``epsilon``).
            "epsilon_paper": _last(self.rows, "privacy_epsilon_paper"),
            "delta": _last(self.rows, "privacy_delta"),
            "dp_epsilon": _last(self.rows, "train_dp-epsilon"),
            "ldp_epsilon": _last(self.rows, "train_ldp-epsilon"),
            "wall_time_s": round(time.perf_counter() - self._started, 3),
            "seed": self.config.seed,
            **extra,
        }
        if self._metrics is None and self._resume_after is not None and status == "completed":
            self._metrics = self._take_folder()  # resumed with no round left: it only ends
        if self._metrics is None:
            return summary
        self._metrics.close()
        atomic.write_text(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        if self.config.plot and self.rows:
            plot_metrics(self.rows, self.run_dir / PLOT_FILE, title=self.config.name)
        return summary


def _failures_by_kind(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Sum each round's ``failures_<kind>`` counts over the run."""
    totals: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("failures_"):
                kind = key.removeprefix("failures_")
                totals[kind] = totals.get(kind, 0) + int(value)
    return dict(sorted(totals.items()))


def _last(rows: list[dict[str, Any]], column: str) -> Any:
    """Return the last round's value of ``column``, or ``None`` if no round has it."""
    return next((r[column] for r in reversed(rows) if column in r), None)


def _total(values: Any) -> float | None:
    """Sum of the values that are not None; None when all are (no simulated devices)."""
    present = [v for v in values if v is not None]
    return round(sum(present), 3) if present else None


def plotted_metrics(columns: set[str]) -> tuple[str, str]:
    """Return the two metrics :func:`plot_metrics` draws from rows with ``columns``.

    The left one is the task's: perplexity for next-token prediction, mse for
    regression, else accuracy; the right one is the loss. A run without them
    (GS-WGAN's generator) plots what its server does measure instead: its first
    other central metric, and ε.
    """
    left = next(
        (m for m in ("perplexity", "mse", "accuracy") if f"central_{m}" in columns), "accuracy"
    )
    if f"central_{left}" not in columns:
        others = sorted(k.removeprefix("central_") for k in columns if k.startswith("central_"))
        left = others[0] if others else left
    right = "loss"
    if f"central_{right}" not in columns and "privacy_epsilon" in columns:
        right = "epsilon"
    return left, right


def plot_metrics(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """Plot :func:`plotted_metrics` per round: the server's, the clients', training loss."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    left, right = plotted_metrics({key for row in rows for key in row})
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for prefix, label in (("central_", "server test set"), ("evaluate_", "clients"),
                          ("privacy_", "spent so far")):  # fmt: skip
        for ax, metric in ((acc_ax, left), (loss_ax, right)):
            points = [(r["round"], r[prefix + metric]) for r in rows if prefix + metric in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
    train = [(r["round"], r["train_train_loss"]) for r in rows if "train_train_loss" in r]
    if train:
        loss_ax.plot(*zip(*train, strict=True), marker=".", label="clients' training")
    for ax, metric in ((acc_ax, left), (loss_ax, right)):
        ax.set_xlabel("round")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic.replacing(path) as partial:
        fig.savefig(partial, dpi=120)
    plt.close(fig)
