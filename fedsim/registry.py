"""Names a config may use for strategies and models, written once, and plug-ins by import path.

``strategy.name`` and ``model.name`` are either a shipped name (``"scaffold"``,
``"cnn"``) or an import path ``"package.module:attribute"`` to a strategy class or
a model factory of the user's, from an installed package or a module in the
current directory. Their ``params`` tables are keyword arguments, checked against
the target's signature before any work: an unknown, missing or mistyped
parameter is a one-line :class:`~fedsim.config.ConfigError` naming it.

A module found through the current directory is also registered with
cloudpickle *by value*, so the threads and Ray engines ship its code to their
workers with the ClientApp instead of expecting to import it there.
"""

import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import cloudpickle

from fedsim.config import ConfigError

#: Shipped strategies: config name -> import path of the class.
STRATEGIES: Mapping[str, str] = {
    "fedavg": "fedsim.strategies:FedAvg",
    "bvr-l-sgd": "fedsim.strategies:BVRLSGD",
    "sarah": "fedsim.strategies:SARAH",
    "minibatch-sgd": "fedsim.strategies:MinibatchSGD",
    "local-sgd": "fedsim.strategies:LocalSGD",
    "scaffold": "fedsim.strategies:SCAFFOLD",
    "gs-wgan": "fedsim.strategies.gs_wgan:GSWGAN",
}

#: Shipped strategies configured like plug-ins, by ``[strategy.params]`` checked against
#: the class's signature, rather than by ``[strategy]`` keys of their own.
PARAMS_STRATEGIES = frozenset({"gs-wgan"})

#: Shipped datasets: config name -> what builds them (``fedsim.data.build_federated_data``
#: loads each by name and partitions it).
DATASETS: Mapping[str, str] = dict.fromkeys(
    ("digits", "synthetic", "least-squares", "pydocs", "mnist", "emnist", "cifar10"),
    "fedsim.data:build_federated_data",
)
#: Shipped datasets that come split by their own clients (``data.partitioner = "natural"``),
#: and those of them that have no other split (each client generates its own samples).
NATURAL_SPLITS = frozenset({"synthetic", "least-squares", "pydocs"})
ONLY_NATURAL = frozenset({"synthetic", "least-squares"})

#: Shipped losses: config name -> import path of the ``nn.Module`` class (``client.loss``).
LOSSES: Mapping[str, str] = {
    "cross-entropy": "torch.nn:CrossEntropyLoss",
    "mse": "torch.nn:MSELoss",
}

#: Shipped models (the zoo, :mod:`fedsim.models`): config name -> import path of the
#: factory ``(input_shape, num_classes, **knobs) -> nn.Module``.
MODELS: Mapping[str, str] = {
    "cnn": "fedsim.models.small:cnn",
    "mlp": "fedsim.models.small:mlp",
    "logreg": "fedsim.models.small:logreg",
    "fedavg-cnn": "fedsim.models.fedavg:fedavg_cnn",
    "fedavg-2nn": "fedsim.models.fedavg:fedavg_2nn",
    "cifar-cnn": "fedsim.models.fedavg:cifar_cnn",
    "char-lstm": "fedsim.models.char_lstm:char_lstm",
    "resnet18-gn": "fedsim.models.resnet:resnet18_gn",
    "transformer": "fedsim.models.transformer:transformer",
}


def takes_params(name: str) -> bool:
    """Whether strategy ``name`` is configured by ``[strategy.params]`` (as a plug-in is)."""
    return is_import_path(name) or name in PARAMS_STRATEGIES


def is_import_path(name: str) -> bool:
    """Whether ``name`` is ``"module:attribute"`` rather than a shipped name."""
    return ":" in name


def check_name(key: str, name: str, shipped: Mapping[str, str]) -> None:
    """Refuse a name that is neither shipped nor an import path (cheap: imports nothing)."""
    if name in shipped or is_import_path(name):
        return
    if not shipped:
        raise ConfigError(f"{key} = {name!r} is not an import path 'module:attribute'")
    close = difflib.get_close_matches(name, shipped, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"{key} = {name!r} is not one of {', '.join(map(repr, shipped))}{hint}, "
        "nor an import path 'module:attribute'"
    )


def resolve(key: str, name: str, shipped: Mapping[str, str]) -> Any:
    """Return the object ``name`` stands for: a shipped one, or one imported by path."""
    check_name(key, name, shipped)
    module_name, _, attribute = shipped.get(name, name).partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{key} = {name!r}: write an import path as 'module:attribute'")
    module = _import(key, module_name)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(
            f"{key} = {name!r}: module {module_name!r} has no {attribute!r}"
        ) from None


def _import(key: str, module_name: str) -> Any:
    """Import ``module_name``, from the current directory too; ship such modules by value."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)  # last: a local file never shadows an installed package
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name!r} ({exc})") from None
    if _found_in(cwd, module_name) and not module_name.startswith("fedsim"):
        cloudpickle.register_pickle_by_value(module)
    return module


def _found_in(folder: str, module_name: str) -> bool:
    """Whether ``module_name``'s top-level module or package sits directly in ``folder``.

    Being somewhere below it is not enough: a virtual environment inside the
    project (``./.venv/.../torch``) holds installed packages, which workers import.
    """
    top = sys.modules.get(module_name.partition(".")[0])
    origin = getattr(top, "__file__", None)
    if not origin:
        return False
    path = Path(origin).resolve()
    location = path.parent.parent if path.name == "__init__.py" else path.parent
    return location == Path(folder).resolve()


def checked_params(
    key: str, target: Callable[..., Any], params: Mapping[str, Any], *, supplied: set[str]
) -> dict[str, Any]:
    """Return ``params`` checked against ``target``'s signature.

    ``supplied`` names the keywords fedsim passes itself (a model's input shape);
    ``params`` may not set them, and the other required ones must be in ``params``.
    Values are checked against ``int``, ``float``, ``str`` and ``bool``
    annotations (an int passes for a float, as in TOML).
    """
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return dict(params)
    parameters = signature.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for name, value in params.items():
        if name in supplied:
            raise ConfigError(f"{key}.{name}: fedsim sets {name!r} itself; remove it")
        if name not in parameters:
            if takes_any:
                continue
            close = difflib.get_close_matches(name, parameters, n=1)
            hint = f" (did you mean '{key}.{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown parameter '{key}.{name}'{hint}; "
                f"{_name(target)} takes {', '.join(parameters) or 'none'}"
            )
        _check_type(f"{key}.{name}", value, parameters[name].annotation)
    missing = [
        name
        for name, p in parameters.items()
        if p.default is p.empty
        and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        and name not in params
        and name not in supplied
    ]
    if missing:
        raise ConfigError(f"{key}.{missing[0]} is required by {_name(target)}; set it")
    return dict(params)


_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_type(key: str, value: Any, annotation: Any) -> None:
    if isinstance(annotation, str):  # postponed annotations: compare by name
        annotation = {t.__name__: t for t in _TYPES}.get(annotation, inspect.Parameter.empty)
    if annotation not in _TYPES:
        return
    ok = (
        isinstance(value, int | float) and not isinstance(value, bool)
        if annotation is float
        else isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    )
    if not ok:
        raise ConfigError(f"{key} = {value!r} must be {_TYPES[annotation]}")


def _name(target: Callable[..., Any]) -> str:
    return getattr(target, "__qualname__", repr(target))
