"""Run a config on the engine it names."""

import logging
from typing import Any

from flwr.clientapp import ClientApp

from fedsim.algorithm import message_types
from fedsim.allocator import pin_malloc_thresholds
from fedsim.clients import make_client_app
from fedsim.composition import strategy_class
from fedsim.config import RunConfig, flatten
from fedsim.engine import InlineGrid
from fedsim.engine.simulated import threads_for
from fedsim.experiment import build_task, client_mods, run_on_grid
from fedsim.results import check_run_folder
from fedsim.sinks import check_packages

logger = logging.getLogger(__name__)


def run_experiment(
    config: RunConfig, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run ``config`` to the end and return its summary (also in ``runs/<name>/``).

    ``resume`` continues the run from its last checkpoint; ``overwrite`` replaces
    the run its folder holds, which is otherwise refused (``ConfigError``) before
    any engine starts. Unless the config says otherwise, glibc's malloc thresholds
    are fixed first (``fedsim.allocator``).
    """
    check_run_folder(config, resume=resume, overwrite=overwrite)
    check_packages(config.logging)  # a missing metric sink's package, before Ray or Flower start
    if config.engine.pin_malloc:
        pin_malloc_thresholds()
    if config.engine.name == "flower":
        return _run_on_flower_simulation(config, resume=resume, overwrite=overwrite)
    if config.engine.name == "ray":
        return _run_on_ray(config, resume=resume, overwrite=overwrite)
    if config.engine.name == "threads":
        return _run_on_threads(config, resume=resume, overwrite=overwrite)
    if config.engine.name == "vmap":
        return _run_on_vmap(config, resume=resume, overwrite=overwrite)
    with InlineGrid(
        engine_client_app(config),
        num_nodes=config.data.num_clients,
        run_config=flatten(config),
        torch_threads=config.engine.torch_threads or None,
        check_finite_arrays=config.engine.check_finite_arrays,
    ) as grid:
        return run_on_grid(config, grid, engine="inline", resume=resume, overwrite=overwrite)


def engine_client_app(config: RunConfig) -> ClientApp:
    """Return the ClientApp fedsim's engines run: the config's task, mods, strategy's actions.

    Built once, here; the threads and Ray engines copy it into their workers. Under
    secure aggregation it answers the protocol's exchanges and no plain ``train``,
    so no unmasked update can leave a client.
    """
    if config.privacy.secure_aggregation:
        from fedsim.clients.secagg_mod import secure_client_app  # the protocol's cryptography

        return secure_client_app(build_task(config), [m.mod for m in client_mods(config)])
    return make_client_app(
        build_task(config), client_mods(config), algorithms=[strategy_class(config)]
    )


def _run_on_vmap(config: RunConfig, *, resume: bool, overwrite: bool) -> dict[str, Any]:
    """Run inline with each cohort's training batched (``fedsim.engine.vmap``)."""
    from fedsim.clients.client_app import make_apps
    from fedsim.engine.vmap import VmapGrid

    mods = client_mods(config)
    algorithm = strategy_class(config)
    refusal: str | None
    if config.privacy.secure_aggregation:
        client_app, refusal = engine_client_app(config), "secure aggregation masks every update"
        cohort_app = None
    else:
        client_app, cohort_app = make_apps(build_task(config), mods, algorithms=[algorithm])
        names = ", ".join(m.name for m in mods)
        refusal = f"client mods ({names}) wrap each message" if mods else None
    if cohort_app is not None and not refusal:
        if unbatched := cohort_app.unbatched(message_types([algorithm])):
            logger.warning("engine vmap: %s's %s %s no batched form and run one at a time",
                           algorithm.__name__, ", ".join(unbatched),
                           "has" if len(unbatched) == 1 else "have")  # fmt: skip
    with VmapGrid(
        client_app,
        cohort_app,
        num_nodes=config.data.num_clients,
        refusal=refusal,
        chunk_size=config.engine.vmap_chunk,
        run_config=flatten(config),
        torch_threads=config.engine.torch_threads or None,
        check_finite_arrays=config.engine.check_finite_arrays,
    ) as grid:
        return run_on_grid(config, grid, engine="vmap", resume=resume, overwrite=overwrite)


def _run_on_threads(config: RunConfig, *, resume: bool, overwrite: bool) -> dict[str, Any]:
    """Run on worker threads of this process, sized like Ray actors from the CPU share."""
    from fedsim.engine.threaded import ThreadedGrid, available_cpus

    engine = config.engine
    workers = engine.num_actors or max(1, int(available_cpus() // engine.num_cpus_per_client))
    with ThreadedGrid(
        engine_client_app(config),
        num_nodes=config.data.num_clients,
        num_workers=workers,
        threads_per_worker=threads_for(engine.num_cpus_per_client),
        run_config=flatten(config),
        check_finite_arrays=engine.check_finite_arrays,
    ) as grid:
        return run_on_grid(
            config, grid, engine="threads", resume=resume, overwrite=overwrite, workers=workers
        )


def _run_on_ray(config: RunConfig, *, resume: bool, overwrite: bool) -> dict[str, Any]:
    """Run on fedsim's Ray engine, shipping the ClientApp built here, its data included.

    The data is built once, here (the server needs its test split anyway); the
    actors receive it with the ClientApp and never import what builds it
    (scikit-learn, Hugging Face's datasets: about two seconds per actor).
    """
    from fedsim.engine.ray_grid import RayGrid, RayResources

    engine = config.engine
    resources = RayResources(
        num_cpus=engine.num_cpus_per_client,
        num_gpus=engine.num_gpus_per_client,
        num_actors=engine.num_actors or None,
    )
    with RayGrid(
        engine_client_app(config),
        num_nodes=config.data.num_clients,
        run_config=flatten(config),
        resources=resources,
        address=engine.ray_address,
        check_finite_arrays=engine.check_finite_arrays,
    ) as grid:
        return run_on_grid(
            config, grid, engine="ray", resume=resume, overwrite=overwrite,
            ray_init_s=round(grid.ray_init_s, 3), ray_startup_s=round(grid.pool_startup_s, 3),
            ray_actors=grid.num_actors,
        )  # fmt: skip


def _run_on_flower_simulation(
    config: RunConfig, *, resume: bool, overwrite: bool
) -> dict[str, Any]:
    """Run under Flower's own ``run_simulation`` (Ray backend): the reference runtime."""
    from flwr.simulation import run_simulation

    from fedsim.app import client_app_for, server_app_for

    summaries: list[dict[str, Any]] = []
    run_simulation(
        server_app=server_app_for(
            lambda _: config,
            engine="flower",
            summaries=summaries,
            resume=resume,
            overwrite=overwrite,
        ),
        client_app=client_app_for(lambda _: config, algorithms=[strategy_class(config)]),
        num_supernodes=config.data.num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if not summaries:
        raise RuntimeError(
            f"Flower's simulation ended before the run finished; see its log above "
            f"and {config.run_dir}/metrics.jsonl"
        )
    return summaries[0]
