"""From a config's names to the strategy class and model factory, checked before any work.

:func:`check_composition` is the config's last check (``parse_config`` calls it):
the strategy and model resolve (shipped names or plug-ins by import path, see
:mod:`fedsim.registry`), a plug-in's ``params`` fit its signature, and every
privacy option the config turns on is one the strategy honours
(:mod:`fedsim.algorithm`). A combination that would run without the protection
it asks for is refused here, in one line, not discovered mid-run or never.
The builders below read the same resolution, so what was checked is what runs.
"""

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedsim.algorithm import privacy_refusal
from fedsim.config import ConfigError, DataConfig, RunConfig
from fedsim.registry import (
    DATASETS,
    LOSSES,
    MODELS,
    STRATEGIES,
    check_name,
    checked_params,
    is_import_path,
    resolve,
    takes_params,
)

if TYPE_CHECKING:
    from torch import nn

    from fedsim.data.datasets import CentralDataset

#: Keywords fedsim passes to a plug-in strategy class that takes them: the run's seed
#: and the cohort sizes of ``strategy.clients_per_round`` and ``strategy.evaluate_clients``.
COHORT_KEYWORDS = (
    "seed",
    "fraction_train",
    "min_train_nodes",
    "fraction_evaluate",
    "min_evaluate_nodes",
    "min_available_nodes",
)
#: Keywords fedsim passes to a plug-in strategy class that takes them besides the cohorts:
#: the shape of one input and the number of classes of the run's dataset.
DATA_SHAPE_KEYWORDS = ("input_shape", "num_classes")
#: Keywords fedsim passes to a plug-in model factory that takes them.
MODEL_KEYWORDS = ("input_shape", "num_classes")
#: Keywords fedsim passes to a plug-in dataset loader that takes them.
DATA_KEYWORDS = ("seed", "test_fraction")
#: ``client.loss``'s default: the loss of the dataset's task (:data:`TASK_LOSSES`).
AUTO_LOSS = "auto"
#: The loss each task trains with unless ``client.loss`` names another.
TASK_LOSSES = {
    "classification": "cross-entropy",
    "regression": "mse",
    "next-token": "cross-entropy",
}


def strategy_class(config: RunConfig) -> type:
    """Return the class ``strategy.name`` names."""
    found = resolve("strategy.name", config.strategy.name, STRATEGIES)
    if not isinstance(found, type):
        raise ConfigError(f"strategy.name = {config.strategy.name!r} is not a class")
    return found


def check_composition(config: RunConfig) -> None:
    """Raise ``ConfigError`` unless the config's pieces fit together; see the module docstring."""
    cls = strategy_class(config)
    _check_params(
        "strategy",
        config.strategy.name,
        cls,
        config.strategy.params,
        COHORT_KEYWORDS + DATA_SHAPE_KEYWORDS,
        configured_by_params=takes_params(config.strategy.name),
    )
    factory = resolve("model.name", config.model.name, MODELS)
    _check_params(
        "model",
        config.model.name,
        factory,
        config.model.params,
        MODEL_KEYWORDS,
        configured_by_params=True,  # the zoo's knobs too
    )
    if config.client.loss != AUTO_LOSS:
        _loss_object(config.client.loss)
    data = config.data
    check_name("data.dataset", data.dataset, DATASETS)
    loader = (
        resolve("data.dataset", data.dataset, DATASETS) if is_import_path(data.dataset) else None
    )
    _check_params("data", data.dataset, loader, data.params, DATA_KEYWORDS)
    if data.load_partition and not callable(
        resolve("data.load_partition", data.load_partition, {})
    ):
        raise ConfigError(f"data.load_partition = {data.load_partition!r} is not a function")
    asked = {
        "client.dp_sgd": config.client.dp_sgd,
        "privacy.local_dp": config.privacy.local_dp,
        "privacy.central_dp": config.privacy.central_dp,
        "privacy.secure_aggregation": config.privacy.secure_aggregation,
    }
    for option in (option for option, on in asked.items() if on):
        reason = privacy_refusal(cls, option)
        if reason is not None:
            raise ConfigError(
                f"{option} = true is refused with strategy.name = {config.strategy.name!r}: "
                f"{reason} (docs/privacy.md lists what combines)"
            )
    _check_secure_aggregation(config)


def _check_secure_aggregation(config: RunConfig) -> None:
    """Refuse what secure aggregation cannot give: a lone client, adaptive clipping."""
    privacy = config.privacy
    if not privacy.secure_aggregation:
        return
    if config.strategy.clients_per_round < 2:
        raise ConfigError(
            "strategy.clients_per_round = 1 is refused with privacy.secure_aggregation = true: "
            "the sum of one update is that update"
        )
    if privacy.central_dp and privacy.adaptive_clipping:
        raise ConfigError(
            "privacy.adaptive_clipping = true is refused with privacy.secure_aggregation = "
            "true: it needs each client's clipped-or-not bit, which the server no longer sees"
        )


def _check_params(
    table: str,
    name: str,
    target: Callable[..., Any] | None,
    params: dict[str, Any],
    passed: tuple[str, ...],
    *,
    configured_by_params: bool | None = None,
) -> None:
    if configured_by_params is None:
        configured_by_params = is_import_path(name)
    if target is None or not configured_by_params:
        if params:
            raise ConfigError(
                f"{table}.params applies to a plug-in given by import path; {name!r} is "
                f"shipped and takes its settings from the [{table}] table"
            )
        return
    checked_params(f"{table}.params", target, params, supplied=_takes(target, passed))


def _takes(target: Callable[..., Any], keywords: tuple[str, ...]) -> set[str]:
    """Those of ``keywords`` that ``target`` accepts."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return set()
    return {k for k in keywords if k in parameters}


def plugin_strategy(config: RunConfig, offered: dict[str, Any]) -> Any:
    """Build a strategy configured by params: its params plus the offered keywords it takes.

    ``offered`` holds the cohort keywords and the data's shape (``DATA_SHAPE_KEYWORDS``).
    """
    cls = strategy_class(config)
    takes = _takes(cls, COHORT_KEYWORDS + DATA_SHAPE_KEYWORDS)
    passed = {k: v for k, v in offered.items() if k in takes}
    return cls(**passed, **config.strategy.params)


def plugin_dataset(data: DataConfig, seed: int) -> "CentralDataset":
    """Load the central dataset of a loader given by import path (``data.dataset``)."""
    from fedsim.data.datasets import CentralDataset  # the data stack: only when a run needs it

    loader = resolve("data.dataset", data.dataset, DATASETS)
    offered = {"seed": seed, "test_fraction": data.test_fraction}
    passed = {k: v for k, v in offered.items() if k in _takes(loader, DATA_KEYWORDS)}
    central = loader(**passed, **data.params)
    if not isinstance(central, CentralDataset):
        raise TypeError(
            f"data.dataset = {data.dataset!r} returned a {type(central).__name__}; "
            "it must return a fedsim.data.datasets.CentralDataset"
        )
    return central


def model_factory(
    config: RunConfig, input_shape: tuple[int, ...], num_classes: int
) -> Callable[[], "nn.Module"]:
    """Return the zero-argument model factory of ``model.name`` with its ``params``."""
    factory = resolve("model.name", config.model.name, MODELS)
    shape = {"input_shape": input_shape, "num_classes": num_classes}
    passed = {k: v for k, v in shape.items() if k in _takes(factory, MODEL_KEYWORDS)}
    params = config.model.params
    return lambda: factory(**passed, **params)


def loss_function(config: RunConfig, task: str) -> Callable[..., Any]:
    """Return the batch-mean loss of ``client.loss`` for a dataset of ``task``.

    A shipped name or an ``nn.Module`` class by import path is instantiated without
    arguments; a function by import path is used as it is.
    """
    name = config.client.loss
    if name == AUTO_LOSS:
        name = TASK_LOSSES[task]
    if task == "regression" and name == "cross-entropy":
        raise ConfigError(
            "client.loss = 'cross-entropy' needs class labels; the dataset is a regression "
            "task: use 'mse' or 'auto'"
        )
    loss = _loss_object(name)
    return loss() if isinstance(loss, type) else loss


def _loss_object(name: str) -> Any:
    """Resolve ``client.loss``: a shipped name, or a class or function by import path."""
    loss = resolve("client.loss", name, LOSSES)
    if not callable(loss):
        raise ConfigError(f"client.loss = {name!r} is not a loss function or class")
    return loss
