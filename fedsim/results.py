"""A run's results on disk: per-round metrics, a summary and a plot.

``metrics.jsonl`` gets one line per round as soon as the round ends (flushed),
so a run that crashes or is interrupted keeps everything it computed; the
summary says how the run ended.
"""

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedsim.checkpoint import RunCheckpoint
from fedsim.config import ConfigError, RunConfig
from fedsim.loop import RoundReport

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
PLOT_FILE = "metrics.png"
CHECKPOINT_FILE = "checkpoint.pt"
# Settings a resumed run may change: how long it runs and how it shows progress.
_RESUMABLE_CHANGES = {"rounds", "progress", "plot"}


def checkpoint_of(config: RunConfig) -> RunCheckpoint | None:
    """Return the run's checkpoint file, or ``None`` when checkpoints are off."""
    if not config.checkpoint_every:
        return None
    return RunCheckpoint(config.run_dir / CHECKPOINT_FILE, every=config.checkpoint_every)


def check_resumable(config: RunConfig) -> int:
    """Return the last saved round of ``config``'s run; raise ``ConfigError`` if it cannot resume.

    The saved run must have the same settings (``rounds`` may grow: a resumed run
    can also extend a finished one).
    """
    checkpoint = checkpoint_of(config)
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is None:
        raise ConfigError(f"nothing to resume: no {CHECKPOINT_FILE} in {config.run_dir}/")
    before = json.loads((config.run_dir / CONFIG_FILE).read_text())
    now = json.loads(json.dumps(asdict(config)))
    changed = sorted(
        key
        for key in set(before) | set(now)
        if key not in _RESUMABLE_CHANGES and before.get(key) != now.get(key)
    )
    if changed:
        raise ConfigError(
            f"cannot resume {config.run_dir}/ with other settings ({', '.join(changed)} "
            "differ); only rounds, progress and plot may change"
        )
    if saved.round >= config.rounds:
        raise ConfigError(
            f"the run already has {saved.round} rounds; set rounds > {saved.round} to extend it"
        )
    return saved.round


class RunRecorder:
    """Write ``runs/<name>/``: config.json, metrics.jsonl, summary.json, metrics.png."""

    def __init__(self, config: RunConfig, *, resume_after: int | None = None) -> None:
        self.config = config
        self.run_dir = config.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
        self.rows: list[dict[str, Any]] = []
        if resume_after is not None:
            # Rounds after the checkpoint (the interrupted one's partial work) are dropped.
            with (self.run_dir / METRICS_FILE).open() as lines:
                rows = [json.loads(line) for line in lines if line.strip()]
            self.rows = [row for row in rows if row["round"] <= resume_after]
        self._metrics = (self.run_dir / METRICS_FILE).open("w")
        for row in self.rows:
            self._metrics.write(json.dumps(row) + "\n")
        self._started = time.perf_counter()

    def on_round(self, report: RoundReport) -> None:
        """Append the round's row to ``metrics.jsonl`` and flush it."""
        row = report.as_row()
        self.rows.append(row)
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def finish(self, status: str, **extra: Any) -> dict[str, Any]:
        """Close the metrics file, write the summary (and plot); return the summary."""
        self._metrics.close()
        last_central: dict[str, Any] = next(
            (r for r in reversed(self.rows) if "central_accuracy" in r), {}
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
            "failures": sum(int(r.get("failures", 0)) for r in self.rows),
            "unavailable": sum(int(r.get("unavailable", 0)) for r in self.rows),
            "late": sum(int(r.get("late", 0)) for r in self.rows),
            "simulated_time_s": _total(r.get("simulated_s") for r in self.rows),
            "epsilon": next(
                (r["privacy_epsilon"] for r in reversed(self.rows) if "privacy_epsilon" in r), None
            ),
            "delta": next(
                (r["privacy_delta"] for r in reversed(self.rows) if "privacy_delta" in r), None
            ),
            "wall_time_s": round(time.perf_counter() - self._started, 3),
            "seed": self.config.seed,
            **extra,
        }
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if self.config.plot and self.rows:
            plot_metrics(self.rows, self.run_dir / PLOT_FILE, title=self.config.name)
        return summary


def _total(values: Any) -> float | None:
    """Sum of the values that are not None; None when all are (no simulated devices)."""
    present = [v for v in values if v is not None]
    return round(sum(present), 3) if present else None


def plot_metrics(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """Plot accuracy and loss per round (centralized, and clients' where present)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for prefix, label in (("central_", "server test set"), ("evaluate_", "clients")):
        for ax, metric in ((acc_ax, "accuracy"), (loss_ax, "loss")):
            points = [(r["round"], r[prefix + metric]) for r in rows if prefix + metric in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
    train = [(r["round"], r["train_train_loss"]) for r in rows if "train_train_loss" in r]
    if train:
        loss_ax.plot(*zip(*train, strict=True), marker=".", label="clients' training")
    for ax, metric in ((acc_ax, "accuracy"), (loss_ax, "loss")):
        ax.set_xlabel("round")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
