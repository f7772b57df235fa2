"""The systems the benchmark compares, each run in the calling process.

This module holds what a child process (``engines.py --run``) executes: fedsim's pieces for
workload W1 (client task, train config, a ClientApp reporting torch's threads, a ``run_rounds``
driver), one runner per system (floor, inline, threads, ray, flower; pfl's is in
``systems_pfl.py``), the scale cases, and ``Timing``, the clock readings each run returns. It is
apart from ``engines.py`` so that the orchestration and command line stay short; it imports
torch, and frameworks only inside the runners, so a child loads nothing beyond the system it
runs.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, cast

# A child's "import s" counts from here: torch and the system's framework come below.
# engines.py imports this module before anything else that loads torch.
_T0 = time.perf_counter()

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from experiments.bench.workload import (  # noqa: E402
    BATCH_SIZE,
    LOCAL_EPOCHS,
    LR,
    ClientData,
    ScaleCase,
    Workload,
    initial_state,
    make_model,
    reference_fedavg,
    seeded_init,
)

# Flower and fedsim's Flower side are imported where used, so the floor's process never
# loads them: its import time and memory are torch's alone.
if TYPE_CHECKING:
    from flwr.app import ConfigRecord, Context, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid

    from fedsim.clients import TorchTask
    from fedsim.loop import RoundReport

THREADS_METRIC = "bench-torch-threads"


class SystemUnavailable(RuntimeError):
    """A system cannot run here (its package or module is missing)."""


@dataclass
class Timing:
    """Clock readings (``time.perf_counter``) of one run, and what it ended with."""

    start: float
    boundaries: list[float] = field(default_factory=list)  # round 1 starts, then each round ends
    end: float = 0.0
    threads: str = ""
    startup_in_round_1: bool = False
    final_state: dict[str, Tensor] | None = None
    ray_init_s: float | None = None  # fedsim ray: ray.init, part of start-up
    ray_startup_s: float | None = None  # fedsim ray: actor pool ready, after ray.init

    def mark(self) -> None:
        """Record a round boundary (after the GPU's queued work, where there is a GPU)."""
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.boundaries.append(time.perf_counter())

    def finish(self) -> Timing:
        """Record the end of the run."""
        self.end = time.perf_counter()
        return self

    def summary(self) -> dict[str, Any]:
        """Return the JSON-ready numbers: import, start-up, total and per-round seconds."""
        round_s = [b - a for a, b in itertools.pairwise(self.boundaries)]
        steady = round_s[1:5] or round_s[:1]
        return {
            "import_s": self.start - _T0,
            "startup_s": None if self.startup_in_round_1 else self.boundaries[0] - self.start,
            "total_s": self.end - self.start,
            "round_s": round_s,
            "steady_round_s": sum(steady) / len(steady),
            "threads": self.threads,
            "ray_init_s": self.ray_init_s,
            "ray_startup_s": self.ray_startup_s,
        }


# --------------------------------------------------------------------------- fedsim pieces


def w1_task(model: str = "cnn", device: str = "cpu") -> TorchTask:
    """Return fedsim's client task for W1 (or D1b's ``model``): cross-entropy, on-demand data."""
    from fedsim.clients import TorchTask

    return TorchTask(
        device=device,
        model_fn=partial(make_model, model),
        loss_fn=nn.CrossEntropyLoss(),
        load_partition=ClientData(model),
        lr=LR,
        local_epochs=LOCAL_EPOCHS,
        batch_size=BATCH_SIZE,
    )


def train_config(seed: int, workload: Workload) -> ConfigRecord:
    """Return what the server sends each round, as ``fedsim.experiment.train_config`` does."""
    from flwr.app import ConfigRecord

    from fedsim import keys

    return ConfigRecord(
        {
            keys.SEED: seed,
            keys.LR: LR,
            keys.LOCAL_EPOCHS: workload.local_epochs,
            keys.BATCH_SIZE: BATCH_SIZE,
        }
    )


def threads_reporting_app(task: TorchTask) -> ClientApp:
    """Return fedsim's ClientApp for ``task``, whose replies also report torch's threads."""
    from flwr.clientapp import ClientApp

    from fedsim import keys
    from fedsim.clients import TorchClient

    client = TorchClient(task)
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        reply = client.train(message, context)
        reply.content.metric_records[keys.METRICS][THREADS_METRIC] = torch.get_num_threads()
        return reply

    return app


class _Marker:
    """A ``run_rounds`` observer marking round boundaries (round 0 comes before round 1)."""

    def __init__(self, timing: Timing) -> None:
        self.timing = timing
        self.threads: set[float] = set()

    def on_round(self, report: RoundReport) -> None:
        self.timing.mark()
        if THREADS_METRIC in report.train:
            self.threads.add(report.train[THREADS_METRIC])


def fedsim_rounds(
    grid: Grid,
    workload: Workload,
    *,
    initial: dict[str, Tensor],
    rounds: int,
    seed: int,
    timing: Timing,
) -> set[float]:
    """Run fedsim's FedAvg on ``grid``; return the thread counts clients reported."""
    from flwr.app import ArrayRecord

    from fedsim.loop import run_rounds
    from fedsim.strategies import FedAvg

    k, n = workload.clients_per_round, workload.num_clients
    strategy = FedAvg(
        seed=seed,
        fraction_train=k / n,
        min_train_nodes=k,
        fraction_evaluate=0.0,
        min_evaluate_nodes=0,
        min_available_nodes=k,
    )
    marker = _Marker(timing)
    arrays = run_rounds(
        strategy=strategy,
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=rounds,
        train_config=train_config(seed, workload),
        observers=[marker],
    )
    timing.final_state = arrays.to_torch_state_dict()
    return marker.threads


def _default_threads() -> str:
    return f"{torch.get_num_threads()} (torch default)"


def _worker_threads(values: set[float], workers: str) -> str:
    return f"{'/'.join(f'{v:g}' for v in sorted(values)) or '?'} per worker, {workers}"


# --------------------------------------------------------------------------- systems


def run_floor(workload: Workload, *, rounds: int, seed: int, device: str = "cpu") -> Timing:
    """Run the plain PyTorch loop: the least any engine can do for W1."""
    timing = Timing(time.perf_counter(), threads=_default_threads())
    timing.final_state = reference_fedavg(
        workload, rounds=rounds, seed=seed, on_round=timing.mark, device=device
    )
    return timing.finish()


def run_inline(workload: Workload, *, rounds: int, seed: int, device: str = "cpu") -> Timing:
    """Run fedsim's InlineGrid: every client in this process, one after the other."""
    from fedsim.clients import make_client_app
    from fedsim.engine import InlineGrid

    timing = Timing(time.perf_counter(), threads=_default_threads())
    grid = InlineGrid(
        make_client_app(w1_task(workload.model, device)), num_nodes=workload.num_clients
    )
    fedsim_rounds(
        grid,
        workload,
        initial=initial_state(seed, workload.model),
        rounds=rounds,
        seed=seed,
        timing=timing,
    )
    return timing.finish()


def run_vmap(workload: Workload, *, rounds: int, seed: int, device: str = "cpu") -> Timing:
    """Run fedsim's VmapGrid: each round's cohort trained as one batched computation."""
    from fedsim.clients.client_app import make_apps
    from fedsim.engine.vmap import VmapGrid

    timing = Timing(time.perf_counter(), threads=_default_threads())
    grid = VmapGrid(*make_apps(w1_task(workload.model, device)), num_nodes=workload.num_clients)
    if not grid.batching:
        raise RuntimeError("the vmap engine refused W1's task (see the log line above)")
    fedsim_rounds(
        grid, workload, initial=initial_state(seed, workload.model), rounds=rounds, seed=seed,
        timing=timing,
    )  # fmt: skip
    timing.threads += f", chunks of {grid.chunk_size}"
    return timing.finish()


def run_threads(workload: Workload, *, rounds: int, seed: int, device: str = "cpu") -> Timing:
    """Run fedsim's ThreadedGrid: 2 worker threads of 1 torch thread each, in this process."""
    from fedsim.engine.threaded import ThreadedGrid

    timing = Timing(time.perf_counter())
    with ThreadedGrid(
        threads_reporting_app(w1_task(workload.model, device)),
        num_nodes=workload.num_clients,
        num_workers=2,
    ) as grid:
        threads = fedsim_rounds(
            grid,
            workload,
            initial=initial_state(seed, workload.model),
            rounds=rounds,
            seed=seed,
            timing=timing,
        )
    timing.threads = _worker_threads(threads, f"{grid.num_workers} threads")
    return timing.finish()


def run_ray(workload: Workload, *, rounds: int, seed: int, device: str = "cpu") -> Timing:
    """Run fedsim's RayGrid, 2 actors of 1 CPU (on a GPU: 0.25 GPU and 1 CPU each, 4 a GPU).

    Ray start-up and shut-down are included.
    The grid starts Ray itself, as ``fedsim run`` does; its start-up splits into
    ``ray.init`` and the actor pool (``ray_init_s``, ``ray_startup_s``).
    """
    try:
        from fedsim.engine.ray_grid import RayGrid, RayResources
    except ImportError as exc:
        raise SystemUnavailable("fedsim.engine.ray_grid not available") from exc

    timing = Timing(time.perf_counter())
    # On a GPU: 4 clients share it (0.25 each), as many actors as that and the CPUs fit.
    gpu = device != "cpu"
    grid = RayGrid(
        threads_reporting_app(w1_task(workload.model, "cuda" if gpu else device)),
        num_nodes=workload.num_clients,
        resources=RayResources(
            num_cpus=1.0, num_gpus=0.25 if gpu else 0.0, num_actors=None if gpu else 2
        ),
    )
    actors = f"{grid.num_actors} actors"
    timing.ray_init_s, timing.ray_startup_s = grid.ray_init_s, grid.pool_startup_s
    try:
        threads = fedsim_rounds(
            grid,
            workload,
            initial=initial_state(seed, workload.model),
            rounds=rounds,
            seed=seed,
            timing=timing,
        )
    finally:
        grid.shutdown()
    timing.threads = _worker_threads(threads, actors)
    return timing.finish()


def run_flower(workload: Workload, *, rounds: int, seed: int, device: str = "cpu") -> Timing:
    """Run Flower's own FedAvg in a ServerApp under ``run_simulation`` (Ray backend).

    ``Strategy.start`` calls ``evaluate_fn`` before round 1 and after every round,
    which times the rounds. The ClientApp is fedsim's, a plain Flower ClientApp.
    CPU only: the benchmark does not size Flower's client resources for a GPU.
    """
    if device != "cpu":
        raise SystemUnavailable("the flower row runs on CPU only")
    from flwr.app import ArrayRecord
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    timing = Timing(time.perf_counter(), startup_in_round_1=True)
    k, n = workload.clients_per_round, workload.num_clients
    threads: set[float] = set()
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=k / n,
            fraction_evaluate=0.0,
            min_train_nodes=k,
            min_evaluate_nodes=0,
            min_available_nodes=k,
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial_state(seed, workload.model)),
            num_rounds=rounds,
            train_config=train_config(seed, workload),
            evaluate_fn=lambda _round, _arrays: timing.mark(),
        )
        timing.final_state = result.arrays.to_torch_state_dict()
        for metrics in result.train_metrics_clientapp.values():
            threads.add(float(cast(float, metrics[THREADS_METRIC])))

    run_simulation(
        server_app=server_app,
        client_app=threads_reporting_app(w1_task(workload.model, device)),
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if timing.final_state is None or len(timing.boundaries) != rounds + 1:
        raise RuntimeError("Flower's ServerApp did not finish its rounds (see the log above)")
    timing.threads = _worker_threads(threads, "1 CPU per client")
    return timing.finish()


def run_scale_case(case: ScaleCase, *, seed: int) -> Timing:
    """Run fedsim inline on a scale case; each client takes one SGD step."""
    from fedsim.clients import TorchTask, make_client_app
    from fedsim.engine import InlineGrid

    timing = Timing(time.perf_counter(), threads=_default_threads())
    task = TorchTask(
        model_fn=case.model,
        loss_fn=nn.CrossEntropyLoss(),
        load_partition=case.client_dataset,
        batch_size=case.samples_per_client,
    )
    grid = InlineGrid(make_client_app(task), num_nodes=case.num_clients)
    workload = Workload(case.label, case.num_clients, case.cohort)
    initial = seeded_init(case.model, seed)
    fedsim_rounds(grid, workload, initial=initial, rounds=case.rounds, seed=seed, timing=timing)
    return timing.finish()
