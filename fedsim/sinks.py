"""Metric sinks: each round's numbers, also in TensorBoard, Weights & Biases or MLflow.

A :class:`MetricSink` is a :class:`~fedsim.loop.RoundObserver` and a context
manager: ``run_on_grid`` opens the sinks that ``[logging]`` asks for in the run's
``ExitStack``, so each one closes, marking its run finished, failed or killed,
however the run ends. Every numeric value of ``RoundReport.as_row()`` is logged at
step = round (``round`` itself is the step, ``num_rounds`` is no measurement).

Like ``RunRecorder``, a sink writes nothing until the run's first new round has
ended: it holds round 0, the initial model's evaluation, until then, so a run that
fails to start leaves its folder as it was. A tool's package is imported when its
sink is built, before any work, and a missing one is a one-line ``ConfigError``
naming the extra that installs it.

A resumed run appends to the same sinks. TensorBoard writes to the same folder
with a purge step that hides what the interrupted run logged after its checkpoint
(an overwriting run purges from round 0: the old run's events vanish from view).
W&B writes another offline run with the same id, which ``wandb sync`` appends to
the first. MLflow continues the store's latest run: the rounds after the checkpoint
that the interrupted run had logged stay in its history beside their reruns, and
its params stay those of the first config (MLflow refuses to change a param).
"""

import importlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

from fedsim.config import ConfigError, LoggingConfig, RunConfig, flatten
from fedsim.loop import RoundReport

Status = Literal["finished", "failed", "interrupted"]
# The W&B project and MLflow experiment of every run; the run is named after the config's.
PROJECT = "fedsim"
_NOT_METRICS = ("round", "num_rounds")


class MetricWriter(Protocol):
    """One tool's run, opened by its constructor: log metrics per step, then close."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at ``step`` (the round)."""

    def close(self, status: Status) -> None:
        """End the tool's run with ``status``; release its files and processes."""


class MetricSink:
    """Hand each round's numbers to a writer that is opened once the run has started.

    Parameters
    ----------
    open_writer
        Opens the tool's run. Called at the first round after round 0, so that a
        run that never starts creates no files.
    """

    def __init__(self, open_writer: Callable[[], MetricWriter]) -> None:
        self._open_writer = open_writer
        self._writer: MetricWriter | None = None
        self._held: list[RoundReport] = []

    def on_round(self, report: RoundReport) -> None:
        """Log the round; round 0 is held until the grid has run a round."""
        self._held.append(report)
        if report.round == 0:
            return
        if self._writer is None:
            self._writer = self._open_writer()
        for held in self._held:
            self._writer.log(numeric_metrics(held), held.round)
        self._held.clear()

    def __enter__(self) -> "MetricSink":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._writer is None:
            return
        if exc_type is None:
            self._writer.close("finished")
        else:
            interrupted = issubclass(exc_type, KeyboardInterrupt)
            self._writer.close("interrupted" if interrupted else "failed")


def numeric_metrics(report: RoundReport) -> dict[str, float]:
    """Return the report's row without its step, its non-numbers and its ``None``s."""
    return {
        key: float(value)
        for key, value in report.as_row().items()
        if key not in _NOT_METRICS
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


class TensorBoardWriter:
    """Event files in ``<run folder>/tb/``, through PyTorch's ``SummaryWriter``.

    TensorBoard stores scalars as float32. Events at or after the purge step that
    an earlier writer left in the folder are hidden from view: a new run purges
    from round 0, a resumed one from the round after its checkpoint.
    """

    def __init__(self, config: RunConfig, *, resume_after: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge_step = 0 if resume_after is None else resume_after + 1
        self._writer = SummaryWriter(config.run_dir / "tb", purge_step=purge_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Add each metric as a scalar at ``step``."""
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)

    def close(self, status: Status) -> None:
        """Flush and close the event file."""
        self._writer.close()


class WandbWriter:
    """A Weights & Biases run in offline mode, in ``<run folder>/wandb/``; never the network.

    The config is the run's config. Offline mode never logs in nor uploads, and
    W&B's own error reports are off (``ENVIRONMENT``). Console capture is off (it
    would wrap the progress bar's stream), and ``reinit="create_new"`` leaves any
    W&B run of the caller's own alone. A resumed run takes the id of the folder's
    latest offline run. Closing it ends W&B's service process too, unless the
    process has a global run of its own.
    """

    def __init__(self, config: RunConfig, *, resume_after: int | None) -> None:
        import wandb

        folder = config.run_dir / "wandb"
        previous = _latest_wandb_id(folder) if resume_after is not None else None
        self._run = wandb.init(
            mode="offline",
            dir=config.run_dir,
            project=PROJECT,
            name=config.name,
            config=asdict(config),
            id=previous,
            resume="allow" if previous else None,
            settings=wandb.Settings(console="off", silent=True, reinit="create_new"),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log the metrics as the history row of ``step``."""
        self._run.log(metrics, step=step)

    def close(self, status: Status) -> None:
        """Finish the run (failed unless ``status`` is finished), then W&B's service."""
        import wandb

        self._run.finish(exit_code=0 if status == "finished" else 1)
        if wandb.run is None:
            wandb.teardown()


def _latest_wandb_id(folder: Path) -> str | None:
    """Return the id of the newest ``offline-run-<time>-<id>`` folder, if any."""
    runs = sorted(folder.glob("offline-run-*"))
    return runs[-1].name.rsplit("-", 1)[1] if runs else None


class MlflowWriter:
    """An MLflow run in the local file store ``<run folder>/mlruns/``.

    Params are the flattened config (``data.num_clients``, ...), metrics are
    logged per step. MLflow 3 keeps its file store in maintenance mode and refuses
    it unless ``MLFLOW_ALLOW_FILE_STORE`` is set (``ENVIRONMENT`` sets it): a folder
    of plain files beside the run's others, and no database to create, is what
    this sink is for.
    """

    def __init__(self, config: RunConfig, *, resume_after: int | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient((config.run_dir / "mlruns").resolve().as_uri())
        experiment = self._client.get_experiment_by_name(PROJECT)
        experiment_id = (
            experiment.experiment_id if experiment else self._client.create_experiment(PROJECT)
        )
        latest = (
            self._client.search_runs(
                [experiment_id], order_by=["attributes.start_time DESC"], max_results=1
            )
            if resume_after is not None
            else []
        )
        if latest:
            self.run_id = latest[0].info.run_id
            self._client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self._client.create_run(experiment_id, run_name=config.name).info.run_id
            params = [Param(key, str(value)) for key, value in flatten(config).items()]
            self._client.log_batch(self.run_id, params=params)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log the metrics at ``step`` in one batch."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        batch = [Metric(key, value, now_ms, step) for key, value in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def close(self, status: Status) -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        mlflow_status = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
        self._client.set_terminated(self.run_id, status=mlflow_status[status])


# Set before a package is imported (MLflow starts its telemetry at import, W&B reads
# its setting when its service process starts), so that no sink uses the network:
# MLflow's usage telemetry and W&B's error reports are off, MLflow's file store allowed.
ENVIRONMENT = {
    "wandb": {"WANDB_ERROR_REPORTING": "false"},
    "mlflow": {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ALLOW_FILE_STORE": "true"},
}
# A [logging] key -> the writer it turns on; each key is also the package and the extra.
WRITERS: dict[str, Callable[..., MetricWriter]] = {
    "tensorboard": TensorBoardWriter,
    "wandb": WandbWriter,
    "mlflow": MlflowWriter,
}


def check_packages(logging: LoggingConfig) -> None:
    """Import the package of each sink that ``logging`` turns on.

    Raises
    ------
    ConfigError
        A package is not installed: one line naming the extra that installs it.
    """
    for name in WRITERS:
        if getattr(logging, name):
            _require(name)


def sinks_for(config: RunConfig, *, resume_after: int | None) -> list[MetricSink]:
    """Return the sinks ``config.logging`` turns on, their packages checked now (before any work).

    ``resume_after`` is the round a resumed run continues after (``None``: a new run).
    """
    check_packages(config.logging)
    return [
        MetricSink(partial(writer, config, resume_after=resume_after))
        for name, writer in WRITERS.items()
        if getattr(config.logging, name)
    ]


def _require(package: str) -> None:
    for name, value in ENVIRONMENT.get(package, {}).items():
        os.environ.setdefault(name, value)  # unless the caller's environment says otherwise
    try:
        importlib.import_module(package)
    except ModuleNotFoundError:
        raise ConfigError(
            f"logging.{package} needs the {package} package: pip install 'fedsim[{package}]'"
        ) from None
