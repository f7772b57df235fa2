"""How long a ``RayGrid``'s actor pool takes to be ready once Ray is up.

::

    python experiments/bench/ray_startup.py                   # 5 grids in each mode
    python experiments/bench/ray_startup.py --app bench --repeat 9 --mode fresh
    python experiments/bench/ray_startup.py --json startup.json

Three ways to start pools, each ``--repeat`` times:

============  ==============================================================================
fresh         a new interpreter each time: ``ray.init``, then one ``RayGrid``; what ``fedsim
              run engine.name=ray`` and the benchmark's ray system pay
in-process    one interpreter, one ``ray.init``, then a new ``RayGrid`` each time (shut down
              before the next): a sweep, a notebook, a test module
kept          as in-process, with ``keep_actors=True``: each grid hands its actors on to the
              next one
============  ==============================================================================

"pool" is ``RayGrid(...)`` from its call until every actor has unpickled the ClientApp and
answered; ``ray.init`` is timed apart (the script calls it itself, so both are timed alike on
any version of ``RayGrid``; ``--mode fresh,in-process`` runs on one without ``keep_actors``).
``--app`` picks the ClientApp the actors unpickle: ``cli``, fedsim's own
(``fedsim.runner.engine_client_app``, what ``fedsim run`` ships), ``bench``, the benchmark's W1 app
(``experiments.bench.systems``), or ``bare``, an empty ``ClientApp``: the floor, Ray plus what
``fedsim.engine.ray_grid`` imports (torch, flwr). The script prints the median and range of
each, the first grid of an interpreter apart from the later ones; docs/engines.md ("Ray
start-up") keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULT = "RAY_STARTUP_RESULT "


def client_app(name: str) -> Any:
    """Return the ClientApp ``--app`` names (built here, unpickled in every actor)."""
    if name == "bare":
        from flwr.clientapp import ClientApp

        return ClientApp()
    if name == "bench":
        from experiments.bench.systems import threads_reporting_app, w1_task

        return threads_reporting_app(w1_task())
    from fedsim.config import parse_config
    from fedsim.runner import engine_client_app

    return engine_client_app(parse_config({}))


def start_ray() -> float:
    """Start a local Ray as ``RayGrid`` would; return the seconds ``ray.init`` took."""
    import ray

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    start = time.perf_counter()
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    return time.perf_counter() - start


def time_pools(app_name: str, *, repeat: int, actors: int, keep: bool) -> dict[str, Any]:
    """Start Ray once, then ``repeat`` grids one after the other; return the seconds."""
    import ray

    from fedsim.engine import ray_grid

    app = client_app(app_name)
    ray_init_s = start_ray()
    pools = []
    options = {"keep_actors": True} if keep else {}
    resources = ray_grid.RayResources(num_actors=actors)
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            with ray_grid.RayGrid(app, num_nodes=10, resources=resources, **options):
                pools.append(time.perf_counter() - start)
        if keep:
            ray_grid.release_kept_actors()
    finally:
        ray.shutdown()
    return {"ray_init_s": [ray_init_s], "first_pool_s": pools[:1], "later_pool_s": pools[1:]}


def time_fresh(app_name: str, *, repeat: int, actors: int) -> dict[str, Any]:
    """Time one pool in each of ``repeat`` new interpreters; return the seconds."""
    runs: dict[str, Any] = {"ray_init_s": [], "first_pool_s": [], "later_pool_s": []}
    for _ in range(repeat):
        child = subprocess.run(
            [sys.executable, __file__, "--child", "--app", app_name, "--actors", str(actors)],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith(RESULT)]
        if child.returncode != 0 or not lines:
            raise RuntimeError(f"child failed ({child.returncode}): {child.stderr[-2000:]}")
        result = json.loads(lines[-1][len(RESULT) :])
        for key in runs:
            runs[key] += result[key]
    return runs


def summary(values: Sequence[float]) -> str:
    """Return 'median s (min-max, n)' of ``values``."""
    return (
        f"{statistics.median(values):6.2f} s  ({min(values):.2f}-{max(values):.2f}, "
        f"n={len(values)})"
    )


MODES = ("fresh", "in-process", "kept")
LABELS = {"ray_init_s": "ray.init", "first_pool_s": "pool", "later_pool_s": "pool, 2nd on"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurements ``--mode`` names and print their medians and ranges."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--app", choices=("cli", "bench", "bare"), default="cli")
    parser.add_argument("--mode", default=",".join(MODES), help="comma-separated subset")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the seconds here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = time_pools(args.app, repeat=1, actors=args.actors, keep=False)
        print(RESULT + json.dumps(result), flush=True)
        return 0
    modes = [m for m in args.mode.split(",") if m]
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"--mode: unknown {unknown}; choose from {', '.join(MODES)}")
    print(
        f"[ray_startup] {os.cpu_count()} CPUs, app {args.app}, {args.actors} actors, "
        f"{args.repeat} grids per mode",
        flush=True,
    )
    results = {}
    for mode in modes:
        if mode == "fresh":
            results[mode] = time_fresh(args.app, repeat=args.repeat, actors=args.actors)
        else:
            keep = mode == "kept"
            results[mode] = time_pools(args.app, repeat=args.repeat, actors=args.actors, keep=keep)
        for key, label in LABELS.items():
            if results[mode][key]:
                print(f"{mode:<11} {label:<13} {summary(results[mode][key])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
