"""Load and soak: memory and round time over hundreds of rounds, on every engine.

::

    python experiments/soak.py                     # 10^5 clients, 1,000 a round, 200 rounds
                                                   # (Ray: 400, measured after its first 200)
    python experiments/soak.py --engine threads --rounds 50 --json soak.json
    nice -n 10 python experiments/soak.py --engine ray --json soak_ray.json

A population of ``--clients`` nodes (default 10^5) runs fedsim's FedAvg for ``--rounds``
rounds, ``--per-round`` clients a round, each training a logistic regression on
``FEATURES`` features for one local epoch. A client's data is generated when it runs, from
``(seed, partition)``, so no dataset exists before a client is sampled and none is kept
after. The clients are fedsim's own (``TorchTask`` through ``make_client_app``), as in any
``fedsim run``; FedAvg's clients keep no ``Context.state``, so a node costs no memory between
its rounds, and the population's size should not show in memory at all.

After every round the script collects garbage and reads resident memory from ``/proc``: this
process (the driver), and on Ray the actors summed (Ray's worker processes) and the
whole process tree (Ray's own daemons included). Per engine it reports the peak, the
least-squares slope of memory over the rounds after ``--warmup`` (MB per 100 rounds, with its
standard error), the slope of round seconds over rounds, and the median round of the first
and the last quarter of those rounds. The target: a slope of at most 1 MB per 100 rounds,
and no growth in round time. Ray's own buffers grow over its first ~10^4 tasks, as a bare
Ray loop of ``ray.put`` and actor tasks shows without fedsim (+7 MB, flat from then on; +2.6 MB
with ``RAY_task_events_report_interval_ms=0``), so on Ray the slope is measured over rounds
200-400 (``RAY_WARMUP``). The standard errors treat rounds as independent; memory moves
in steps (the allocator takes and returns pages in chunks), so they are a lower bound.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from experiments.bench.measure import rss_bytes  # noqa: E402
from fedsim import keys  # noqa: E402
from fedsim.processes import process_tree  # noqa: E402
from fedsim.seeding import derive_seed  # noqa: E402

ENGINES = ("inline", "threads", "ray")
FEATURES = 8
SAMPLES = 16  # per client: one batch
LR = 0.1
SLOPE_BOUND_MB = 1.0  # per 100 rounds
MB = 2**20


# --------------------------------------------------------------------------- workload


def client_data(partition_id: int, _num_partitions: int, *, seed: int) -> TensorDataset:
    """Return a client's samples, generated from ``(seed, partition)`` each time it runs.

    Labels follow a logistic model whose weights depend on ``seed`` alone, with a per-client
    shift of the features (a mild non-IID split).
    """
    weights = torch.Generator().manual_seed(derive_seed(seed, 0, 0, "soak-weights"))
    true_w = torch.randn(FEATURES, generator=weights)
    rng = torch.Generator().manual_seed(derive_seed(seed, 0, partition_id, "soak-data"))
    x = torch.randn(SAMPLES, FEATURES, generator=rng) + torch.randn(FEATURES, generator=rng)
    y = (torch.rand(SAMPLES, generator=rng) < torch.sigmoid(x @ true_w)).long()
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    """Logistic regression as a two-class linear layer (18 parameters)."""
    return nn.Linear(FEATURES, 2)


def soak_app(seed: int) -> Any:
    """Return fedsim's ClientApp for the soak task."""
    from fedsim.clients import TorchTask, make_client_app

    task = TorchTask(
        model_fn=make_model,
        loss_fn=nn.CrossEntropyLoss(),
        load_partition=functools.partial(client_data, seed=seed),
        lr=LR,
        local_epochs=1,
        batch_size=SAMPLES,
    )
    return make_client_app(task)


@dataclass
class Options:
    """One soak run's settings."""

    engine: str
    clients: int = 100_000
    per_round: int = 1_000
    rounds: int = 200  # Ray: RAY_ROUNDS
    warmup: int = 20  # Ray: RAY_WARMUP
    seed: int = 0
    workers: int = 2  # worker threads or Ray actors
    progress_every: int = 10  # rounds between progress lines; 0: none


# Ray's own buffers (task events, above all) fill over its first ~10^4 tasks, in a bare Ray
# loop without fedsim too: about 200 rounds here. Its slope is measured after them.
RAY_ROUNDS, RAY_WARMUP = 400, 200


# --------------------------------------------------------------------------- memory


def rss_mb(pids: set[int]) -> float:
    """Return the summed resident set size of ``pids`` (those that still exist), in MB."""
    return rss_bytes(pids) / MB


def actor_pids(tree: set[int]) -> set[int]:
    """Return the processes of ``tree`` that run Ray workers: the grid's actors.

    Ray retitles a worker ``ray::_NodeActor`` only where ``setproctitle`` is
    installed; otherwise its command line still names ``default_worker.py``.
    """
    pids = set()
    for pid in tree:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command = cmdline.read()
                if command.startswith(b"ray::") or b"/ray/_private/workers/" in command:
                    pids.add(pid)
        except OSError:
            continue
    return pids


@dataclass
class Samples:
    """What the observer reads after each round."""

    round_s: list[float] = field(default_factory=list)
    driver_mb: list[float] = field(default_factory=list)
    actors_mb: list[float] = field(default_factory=list)
    tree_mb: list[float] = field(default_factory=list)
    nodes_with_state: list[int] = field(default_factory=list)


class Sampler:
    """A ``run_rounds`` observer: garbage-collects, then reads memory, after every round."""

    def __init__(self, grid: Any, options: Options, *, ray: bool) -> None:
        self.grid, self.options, self.ray = grid, options, ray
        self.samples = Samples()
        self._start = time.perf_counter()

    def on_round(self, report: Any) -> None:
        """Record the round's seconds, memory and nodes keeping state; print progress."""
        if report.round == 0:
            return
        gc.collect()
        s, me = self.samples, os.getpid()
        s.round_s.append(report.round_s)
        s.driver_mb.append(rss_mb({me}))
        s.nodes_with_state.append(self.grid.nodes.num_with_state)
        if self.ray:
            tree = process_tree(me)  # the grid started Ray: its daemons are our children
            s.actors_mb.append(rss_mb(actor_pids(tree)))
            s.tree_mb.append(rss_mb(tree))
        every = self.options.progress_every
        if every and (report.round % every == 0 or report.round == report.num_rounds):
            extra = f" actors {s.actors_mb[-1]:7.1f} MB" if self.ray else ""
            print(
                f"  [{self.options.engine}] round {report.round:4d}/{report.num_rounds}"
                f"  {report.round_s:6.3f} s  driver {s.driver_mb[-1]:7.1f} MB{extra}"
                f"  nodes with state {s.nodes_with_state[-1]:6d}"
                f"  elapsed {time.perf_counter() - self._start:6.0f} s",
                file=sys.stderr,
                flush=True,
            )


# --------------------------------------------------------------------------- statistics


def least_squares(
    ys: Sequence[float], *columns: Sequence[float]
) -> tuple[list[float], list[float]]:
    """Fit ``ys`` on an intercept and ``columns``; return the coefficients and standard errors.

    The intercept's own pair is left out. Standard errors assume independent residuals.
    """
    x = np.column_stack([np.ones(len(ys)), *columns])
    y = np.asarray(ys, dtype=float)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    dof = len(y) - x.shape[1]
    sigma2 = float(np.sum((y - x @ coef) ** 2)) / dof if dof > 0 else float("nan")
    cov = sigma2 * np.linalg.pinv(x.T @ x)
    return [float(c) for c in coef[1:]], [float(v) ** 0.5 for v in np.diag(cov)[1:]]


def memory_fit(mb: Sequence[float], rounds: Sequence[int]) -> dict[str, float]:
    """Return memory's least-squares slope over rounds, in MB per 100 rounds, with its SE."""
    (slope,), (se,) = least_squares(mb, rounds)
    return {"rss_slope_mb_per_100": 100 * slope, "rss_slope_se_mb_per_100": 100 * se}


def summarize(samples: Samples, warmup: int) -> dict[str, Any]:
    """Return peak memory, memory slopes after ``warmup`` rounds and round-time drift."""
    rounds = list(range(1, len(samples.round_s) + 1))
    kept = slice(min(warmup, len(rounds) - 4), None)
    xs = rounds[kept]
    result: dict[str, Any] = {"measured_rounds": len(xs), "first_measured_round": xs[0]}
    for name in ("driver_mb", "actors_mb", "tree_mb"):
        series = getattr(samples, name)
        if series:
            fit = memory_fit(series[kept], xs)
            result[name] = {"peak": max(series), "first": series[0], "last": series[-1], **fit}
    # What fedsim itself holds: the driver, plus the actors on Ray.
    fedsim_mb = samples.driver_mb
    if samples.actors_mb:
        fedsim_mb = [d + a for d, a in zip(samples.driver_mb, samples.actors_mb, strict=True)]
    result["rss_peak_mb"] = max(fedsim_mb)
    result.update(memory_fit(fedsim_mb[kept], xs))
    times = samples.round_s[kept]
    (b,), (se,) = least_squares(times, xs)
    quarter = max(1, len(times) // 4)
    result["round_s_median"] = statistics.median(times)
    result["round_s_slope_per_100"] = 100 * b
    result["round_s_slope_se_per_100"] = 100 * se
    result["round_s_first_quarter"] = statistics.median(times[:quarter])
    result["round_s_last_quarter"] = statistics.median(times[-quarter:])
    result["nodes_with_state"] = samples.nodes_with_state[-1]
    return result


# --------------------------------------------------------------------------- engines


def open_grid(options: Options, app: Any) -> Any:
    """Return the engine's grid (a context manager), with ``workers`` workers or actors."""
    if options.engine == "inline":
        from fedsim.engine import InlineGrid

        return InlineGrid(app, num_nodes=options.clients, torch_threads=1)
    if options.engine == "threads":
        from fedsim.engine import ThreadedGrid

        return ThreadedGrid(app, num_nodes=options.clients, num_workers=options.workers)
    if options.engine == "ray":
        from fedsim.engine import RayGrid, RayResources

        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        resources = RayResources(num_cpus=1.0, num_actors=options.workers)
        return RayGrid(app, num_nodes=options.clients, resources=resources)
    raise ValueError(f"unknown engine {options.engine!r}; choose from {', '.join(ENGINES)}")


def soak(options: Options) -> dict[str, Any]:
    """Run one engine's soak; return its settings, summary and per-round series."""
    import cloudpickle

    from fedsim.loop import run_rounds
    from fedsim.strategies import FedAvg

    # Ray's actors unpickle the task's data function: ship this module by value, as it is
    # not installed where they run.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if options.per_round > options.clients:
        raise ValueError("--per-round cannot exceed --clients")
    strategy = FedAvg(
        seed=options.seed,
        fraction_train=options.per_round / options.clients,
        min_train_nodes=options.per_round,
        fraction_evaluate=0.0,
        min_evaluate_nodes=0,
        min_available_nodes=options.per_round,
    )
    initial = {k: torch.zeros_like(v) for k, v in make_model().state_dict().items()}
    config = ConfigRecord({keys.SEED: options.seed, keys.LR: LR, keys.LOCAL_EPOCHS: 1})
    start = time.perf_counter()
    with open_grid(options, soak_app(options.seed)) as grid:
        startup_s = time.perf_counter() - start
        sampler = Sampler(grid, options, ray=options.engine == "ray")
        run_rounds(
            strategy=strategy,
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=options.rounds,
            train_config=config,
            observers=[sampler],
        )
    return {
        "engine": options.engine,
        "options": asdict(options),
        "startup_s": startup_s,
        "total_s": time.perf_counter() - start,
        "summary": summarize(sampler.samples, options.warmup),
        "series": asdict(sampler.samples),
    }


# --------------------------------------------------------------------------- report


def table(results: Sequence[dict[str, Any]]) -> str:
    """Return the per-engine summary as a Markdown table (slopes per 100 rounds, ± SE)."""
    lines = [
        "| engine | peak RSS MB | RSS slope MB | nodes with state | "
        "round s | round s slope | quarter 1 / 4 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        lines.append(
            f"| {r['engine']} | {s['rss_peak_mb']:.0f} | {s['rss_slope_mb_per_100']:+.2f} "
            f"± {s['rss_slope_se_mb_per_100']:.2f} | {s['nodes_with_state']} | "
            f"{s['round_s_median']:.3f} | {s['round_s_slope_per_100']:+.3f} "
            f"± {s['round_s_slope_se_per_100']:.3f} | {s['round_s_first_quarter']:.3f} / "
            f"{s['round_s_last_quarter']:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="all", choices=(*ENGINES, "all"))
    parser.add_argument("--clients", type=int, default=Options.clients)
    parser.add_argument("--per-round", type=int, default=Options.per_round)
    parser.add_argument("--rounds", type=int, help=f"default {Options.rounds}; Ray {RAY_ROUNDS}")
    parser.add_argument("--warmup", type=int, help=f"default {Options.warmup}; Ray {RAY_WARMUP}")
    parser.add_argument("--seed", type=int, default=Options.seed)
    parser.add_argument("--workers", type=int, default=Options.workers)
    parser.add_argument("--progress-every", type=int, default=Options.progress_every)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak on each engine asked for; print the table, write the JSON.

    Returns 1 when an engine's memory slope is above ``SLOPE_BOUND_MB``.
    """
    args = parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    engines = ENGINES if args.engine == "all" else (args.engine,)
    results = []
    for engine in engines:
        options = Options(
            engine=engine,
            clients=args.clients,
            per_round=args.per_round,
            rounds=args.rounds or (RAY_ROUNDS if engine == "ray" else Options.rounds),
            warmup=args.warmup or (RAY_WARMUP if engine == "ray" else Options.warmup),
            seed=args.seed,
            workers=args.workers,
            progress_every=args.progress_every,
        )
        results.append(soak(options))
    print(table(results))
    failed = [r["engine"] for r in results if r["summary"]["rss_slope_mb_per_100"] > SLOPE_BOUND_MB]
    if failed:
        print(f"memory slope above {SLOPE_BOUND_MB} MB per 100 rounds: {', '.join(failed)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
