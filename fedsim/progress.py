"""A live progress bar: round, loss, accuracy, failures and ETA."""

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedsim.loop import RoundReport


class ProgressBar:
    """Rich progress bar fed by :class:`RoundReport`; use as a context manager."""

    def __init__(
        self, num_rounds: int, *, description: str, console: Console | None = None
    ) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("round"),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._progress.add_task(description, total=num_rounds, status="")

    def __enter__(self) -> "ProgressBar":
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def on_round(self, report: RoundReport) -> None:
        """Advance to ``report.round`` and show its latest metrics."""
        self._progress.update(self._task, completed=report.round, status=status_line(report))


def status_line(report: RoundReport) -> str:
    """``loss 0.41 acc 0.873 fail 0``: the numbers a user watches during a run."""
    parts = []
    loss = report.central.get("loss", report.train.get("train_loss"))
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if (accuracy := report.central.get("accuracy")) is not None:
        parts.append(f"acc {accuracy:.3f}")
    if (perplexity := report.central.get("perplexity")) is not None:
        parts.append(f"ppl {perplexity:.2f}")
    if (mse := report.central.get("mse")) is not None:
        parts.append(f"mse {mse:.4f}")
    if (epsilon := report.privacy.get("epsilon")) is not None:
        parts.append(f"ε {epsilon:.2f}")
        if (paper := report.privacy.get("epsilon_paper")) is not None:
            parts.append(f"(paper's accounting {paper:.2f})")
    if report.simulated_s is not None:
        parts.append(f"sim {report.simulated_s:.1f}s")
    if report.unavailable or report.late:
        parts.append(f"[yellow]offline {report.unavailable} late {report.late}[/yellow]")
    if report.failures > report.unavailable + report.late:
        parts.append(f"[red]fail {report.failures - report.unavailable - report.late}[/red]")
    return " ".join(parts)
