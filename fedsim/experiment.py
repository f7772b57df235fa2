"""From a :class:`RunConfig` to a finished run: build the pieces, run them on a grid.

:func:`run_on_grid` is the one entry every engine goes through (the inline
engine, Flower's simulation, a SuperLink under ``flwr run``), so results,
progress and seeding behave the same everywhere.
"""

import contextlib
from collections.abc import Callable
from functools import lru_cache
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, UserConfig
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch.utils.data import Dataset, TensorDataset

from fedsim import keys
from fedsim.algorithm import STANDARD_MESSAGE_TYPES, ClientMod, HoldsServerModel, message_types
from fedsim.atomic import replacing
from fedsim.clients import TorchTask
from fedsim.clients.dp_sgd import DPSGD
from fedsim.clients.training import evaluate
from fedsim.composition import (
    loss_function,
    model_factory,
    plugin_dataset,
    plugin_strategy,
    strategy_class,
)
from fedsim.config import DataConfig, DevicesConfig, RunConfig
from fedsim.data import FederatedData, build_federated_data
from fedsim.data.datasets import CentralDataset
from fedsim.data.federated import load_central, partitioned
from fedsim.faults import FaultPlan
from fedsim.loop import EvaluateFn, RoundObserver, run_rounds
from fedsim.progress import ProgressBar
from fedsim.registry import is_import_path, resolve, takes_params
from fedsim.results import MODEL_FILE, RunRecorder, check_run_folder, checkpoint_of
from fedsim.seeding import SERVER_NODE, derive_seed
from fedsim.sinks import sinks_for
from fedsim.strategies import BVRLSGD, SARAH, SCAFFOLD, FedAvg, LocalSGD, MinibatchSGD


@lru_cache(maxsize=2)
def federated_data(data: DataConfig, seed: int) -> FederatedData:
    """Load and partition the dataset once per process (server, or each Ray worker)."""
    if is_import_path(data.dataset):
        return partitioned(
            plugin_dataset(data, seed),
            partitioner=data.partitioner,
            num_clients=data.num_clients,
            seed=seed,
            alpha=data.alpha,
            shards_per_client=data.shards_per_client,
            q=data.q,
        )
    return build_federated_data(
        dataset=data.dataset,
        partitioner=data.partitioner,
        num_clients=data.num_clients,
        seed=seed,
        alpha=data.alpha,
        shards_per_client=data.shards_per_client,
        q=data.q,
        test_fraction=data.test_fraction,
        synthetic_alpha=data.synthetic_alpha,
        synthetic_beta=data.synthetic_beta,
    )


@lru_cache(maxsize=2)
def central_dataset(data: DataConfig, seed: int) -> CentralDataset:
    """Load the config's central dataset; partition it only if the clients need that.

    Nodes that bring their own data (``data.load_partition``) need from it only the
    input shape and classes, and the server its test split: partitioning would
    import flwr-datasets (about 3 s of CPU in every ClientApp process of a
    deployment) for nothing.
    """
    if not data.load_partition or data.dataset == "synthetic":
        return federated_data(data, seed).central
    if is_import_path(data.dataset):
        return plugin_dataset(data, seed)
    return load_central(data.dataset, seed=seed, test_fraction=data.test_fraction)


def build_task(config: RunConfig) -> TorchTask:
    """Build the client-side task of a config: model, loss, partitions, hyperparameters."""

    def load_partition(partition_id: int, num_partitions: int) -> Dataset:
        data = federated_data(config.data, config.seed)
        if num_partitions != data.num_partitions:
            raise ValueError(
                f"the federation has {num_partitions} nodes but data.num_clients = "
                f"{data.num_partitions}; make them equal"
            )
        return data.client_dataset(partition_id)

    central = central_dataset(config.data, config.seed)
    node_data = config.data.load_partition
    return TorchTask(
        model_fn=model_factory(config, central.input_shape, central.num_classes),
        loss_fn=loss_function(config, central.task),
        task=central.task,
        load_partition=None if node_data else load_partition,
        load_node_data=node_loader(node_data) if node_data else None,
        device=config.client.device,
        lr=config.client.lr,
        local_epochs=config.client.local_epochs,
        batch_size=config.client.batch_size,
        dp_sgd=DPSGD(
            noise_multiplier=config.client.dp_noise_multiplier,
            max_grad_norm=config.client.dp_max_grad_norm,
            delta=config.client.dp_delta,
        )
        if config.client.dp_sgd
        else None,
    )


def node_loader(import_path: str) -> Callable[[UserConfig], Dataset]:
    """Return the ``data.load_partition`` hook, checking what it returns."""
    hook = resolve("data.load_partition", import_path, {})

    def load_node_data(node_config: UserConfig) -> Dataset:
        dataset = hook(node_config)
        if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"data.load_partition = {import_path!r} returned a {type(dataset).__name__}; "
                "it must return a torch.utils.data.Dataset with a length"
            )
        return dataset

    return load_node_data


def build_strategy(config: RunConfig) -> Strategy:
    """Build the config's strategy, wrapped in central DP and/or secure aggregation."""
    strategy = _base_strategy(config)
    privacy = config.privacy
    if not (privacy.central_dp or privacy.secure_aggregation):
        return strategy
    # The wrappers load Opacus and the protocol's cryptography: only when asked for.
    from fedsim.strategies.central_dp import CentralDP
    from fedsim.strategies.gaussian_sum_release import GaussianSumRelease
    from fedsim.strategies.secure_aggregation import SecureAggregation
    from fedsim.strategies.secure_central_dp import SecureCentralDP

    if not privacy.central_dp:
        return SecureAggregation(
            strategy,
            clip_range=privacy.secagg_clip_range,
            max_weight=privacy.secagg_max_weight,
            threshold_fraction=privacy.secagg_threshold,
        )
    release = {
        "noise_multiplier": privacy.noise_multiplier,
        "clip_norm": privacy.clip_norm,
        "expected_cohort_size": config.strategy.clients_per_round,
        "sampling": privacy.sampling,
        "accountant": privacy.accountant,
        "delta": privacy.delta,
        "noise_cohort_size": privacy.noise_cohort_size or None,
        "accounting_population": privacy.accounting_population or None,
        "seed": config.seed,
    }
    if privacy.secure_aggregation:
        return SecureCentralDP(
            strategy,
            release=GaussianSumRelease(**release),
            threshold_fraction=privacy.secagg_threshold,
        )
    return CentralDP(strategy, adaptive_clipping=privacy.adaptive_clipping, **release)


def client_mods(config: RunConfig) -> list[ClientMod]:
    """Return the client mods the config asks for: injected faults, local privatization.

    Faults come first, outermost, so they corrupt what would leave the device; they
    handle every message type the strategy sends. The separated privatizer
    rewrites the model a plain ``train`` reply carries and lets ``evaluate``
    replies (metrics only) pass: those are the types it handles.
    """
    mods = []
    faults = config.faults
    if faults.fraction > 0:
        plan = FaultPlan(faults.fraction, faults.kind_list, config.seed, faults.hang_s)
        sent = message_types([strategy_class(config)])
        mods.append(ClientMod(plan.mod(), handles=sent, name="fault injection"))
    privacy = config.privacy
    if not privacy.local_dp:
        return mods
    from fedsim.clients.private_update import (  # loads SciPy: only when asked for
        SeparatedPrivatization,
        separated_privatization_mod,
    )

    mod = separated_privatization_mod(
        SeparatedPrivatization(
            epsilon_direction=privacy.epsilon_direction,
            epsilon_magnitude=privacy.epsilon_magnitude,
            clip_radius=privacy.local_clip,
            levels=privacy.magnitude_levels,
        )
    )
    return [*mods, ClientMod(mod, handles=STANDARD_MESSAGE_TYPES, name="local privatization")]


def _base_strategy(config: RunConfig) -> Strategy:
    """Build the config's strategy, with cohorts given as absolute sizes."""
    strategy = config.strategy
    population = config.data.num_clients
    train, evaluate_ = strategy.clients_per_round, strategy.evaluate_clients
    cohorts: dict[str, Any] = {
        "seed": config.seed,
        "fraction_train": train / population,
        "min_train_nodes": train,
        "fraction_evaluate": evaluate_ / population,
        "min_evaluate_nodes": evaluate_,
        "min_available_nodes": max(train, evaluate_),
    }
    if takes_params(strategy.name):
        central = central_dataset(config.data, config.seed)
        shape = {"input_shape": central.input_shape, "num_classes": central.num_classes}
        return cast(Strategy, plugin_strategy(config, {**cohorts, **shape}))
    if strategy.name == "fedavg":
        return FedAvg(**cohorts)
    gradient = {
        **cohorts,
        "lr": config.client.lr,
        "batch_size": config.client.batch_size,
        "local_steps": strategy.local_steps,
    }
    staged = {
        "stage_rounds": strategy.stage_rounds,
        "reference_batch_size": strategy.reference_batch_size,
    }
    builders: dict[str, Callable[[], FedAvg]] = {
        "bvr-l-sgd": lambda: BVRLSGD(**gradient, **staged),
        "sarah": lambda: SARAH(**gradient, **staged),
        "minibatch-sgd": lambda: MinibatchSGD(**gradient),
        "local-sgd": lambda: LocalSGD(**gradient),
        "scaffold": lambda: SCAFFOLD(**gradient, server_lr=strategy.server_lr),
    }
    return builders[strategy.name]()


def train_config(config: RunConfig) -> ConfigRecord:
    """Return what the server sends clients each round (the strategy adds the round)."""
    return ConfigRecord(
        {
            keys.SEED: config.seed,
            keys.LR: config.client.lr,
            keys.LOCAL_EPOCHS: config.client.local_epochs,
            keys.BATCH_SIZE: config.client.batch_size,
        }
    )


def initial_arrays(task: TorchTask, seed: int) -> ArrayRecord:
    """Return the global model before round 1, initialized from the run's seed alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 0, SERVER_NODE, "init"))
        return ArrayRecord(task.model_fn().state_dict())


def central_evaluator(task: TorchTask, test_set: Dataset) -> EvaluateFn:
    """Evaluate global arrays on the server's held-out test split."""
    model = task.model_fn()

    def evaluate_fn(_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate(
            model,
            test_set,
            loss_fn=task.loss_fn,
            batch_size=512,
            device=torch.device("cpu"),
            task=task.task,
        )
        return MetricRecord(metrics)

    return evaluate_fn


def with_devices(devices: DevicesConfig, grid: Grid, *, seed: int) -> Grid:
    """Wrap ``grid`` in simulated device heterogeneity when the config enables it."""
    if not devices.enabled:
        return grid
    from fedsim.engine.devices import CsvProfiles, SampledProfiles
    from fedsim.engine.heterogeneity import HeterogeneousGrid

    profiles = (
        CsvProfiles(devices.csv)
        if devices.csv
        else SampledProfiles(
            seed=seed,
            speed_sigma=devices.speed_sigma,
            availability_mean=devices.availability_mean,
            availability_concentration=devices.availability_concentration,
            bandwidth_median_mbps=devices.bandwidth_median_mbps,
            bandwidth_sigma=devices.bandwidth_sigma,
        )
    )
    return HeterogeneousGrid(grid, profiles, seed=seed, deadline_s=devices.deadline_s or None)


def run_on_grid(
    config: RunConfig,
    grid: Grid,
    *,
    engine: str,
    resume: bool = False,
    overwrite: bool = False,
    **engine_info: Any,
) -> dict[str, Any]:
    """Run ``config`` on ``grid`` with progress and result files; return the summary.

    A folder that already holds a run is refused before any work unless
    ``overwrite`` (or ``resume``), and touched only once the run's first round has
    ended (:class:`RunRecorder`): a run that fails to start leaves it as it was.
    From then on the summary and metrics are written even when the run fails or
    is interrupted, with ``status`` saying so, and a checkpoint after every
    ``checkpoint_every`` rounds lets ``resume=True`` continue from the last one.
    ``engine_info`` (e.g. Ray's start-up time) goes into the summary. The metric sinks
    of ``config.logging`` (``fedsim.sinks``) follow the rounds beside the recorder.
    """
    resume_after = check_run_folder(config, resume=resume, overwrite=overwrite)
    sinks = sinks_for(config, resume_after=resume_after)  # a missing package: before any work
    task = build_task(config)
    strategy = build_strategy(config)
    central = central_dataset(config.data, config.seed)
    if isinstance(strategy, HoldsServerModel):  # GS-WGAN: the global model is the server's
        first_arrays = strategy.initial_arrays()
        evaluate_fn = strategy.central_evaluator(central.test_x, central.test_y)
    else:
        first_arrays = initial_arrays(task, config.seed)
        evaluate_fn = central_evaluator(task, TensorDataset(central.test_x, central.test_y))
    grid = with_devices(config.devices, grid, seed=config.seed)
    checkpoint = checkpoint_of(config, resume=resume)
    recorder = RunRecorder(config, resume_after=resume_after)
    status = "failed"
    arrays = None
    try:
        with contextlib.ExitStack() as stack:
            observers: list[RoundObserver] = [recorder]
            observers += [stack.enter_context(sink) for sink in sinks]
            if config.progress:
                observers.append(
                    stack.enter_context(ProgressBar(config.rounds, description=config.name))
                )
            arrays = run_rounds(
                strategy=strategy,
                grid=grid,
                initial_arrays=first_arrays,
                num_rounds=config.rounds,
                train_config=train_config(config),
                evaluate_fn=evaluate_fn,
                eval_every=config.eval_every,
                timeout=config.engine.timeout_s,
                observers=observers,
                checkpoint=checkpoint,
            )
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        summary = recorder.finish(status, engine=engine, **engine_info)
    if arrays is not None:
        with replacing(config.run_dir / MODEL_FILE) as partial:  # complete, or absent
            torch.save(arrays.to_torch_state_dict(), partial)
    return summary
