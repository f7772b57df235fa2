"""fedsim as Flower apps: the same server and client logic under any Flower runtime.

``client_app`` and ``server_app`` read fedsim's config from Flower's
``run_config`` (``[tool.flwr.app.config]`` in ``pyproject.toml``, or
``flwr run . --run-config "rounds=5 data.num_clients=20"``), so
``flwr run`` starts the very run that ``fedsim run`` would. ``flwr run`` has no
``--overwrite`` flag: the run-config key ``overwrite = true`` stands in for it.
"""

from collections.abc import Callable, Iterable
from functools import lru_cache

from flwr.app import Context, Message, MessageType, UserConfig
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.serverapp import Grid, ServerApp

from fedsim.algorithm import check_mods, message_types
from fedsim.clients import TorchClient
from fedsim.clients import client_app as routed_client_app
from fedsim.clients.secagg_mod import SecAggClient
from fedsim.composition import strategy_class
from fedsim.config import ConfigError, RunConfig, parse_config, unflatten
from fedsim.experiment import build_task, client_mods, run_on_grid
from fedsim.registry import STRATEGIES, resolve

ConfigResolver = Callable[[Context], RunConfig]
# The run-config key that replaces a run folder's results, as `fedsim run --overwrite`
# does: what to do with a folder, not part of the run, so not in RunConfig.
OVERWRITE = "overwrite"


def config_from_run_config(run_config: UserConfig) -> RunConfig:
    """Parse Flower's flat ``run_config`` (dotted keys) into a :class:`RunConfig`."""
    return parse_config(unflatten({k: v for k, v in run_config.items() if k != OVERWRITE}))


def overwrite_of(run_config: UserConfig) -> bool:
    """Return the run config's ``overwrite`` (default false); ``ConfigError`` unless a bool."""
    value = run_config.get(OVERWRITE, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{OVERWRITE} = {value!r} has the wrong type; expected true or false")
    return value


@lru_cache(maxsize=4)
def _client(config: RunConfig) -> TorchClient:
    # One client (model instance and data) per process and config: a Ray worker
    # builds it on its first message and reuses it for every node it simulates.
    return TorchClient(build_task(config))


def client_app_for(resolve: ConfigResolver, *, algorithms: Iterable[type] = ()) -> ClientApp:
    """Build a ClientApp whose task (and mods) come from the config ``resolve`` finds.

    It answers the client actions of ``algorithms`` (strategy classes) besides
    ``train`` and ``evaluate``, and secure aggregation's four exchanges; a config's
    mods are checked against its own strategy's message types when first used. A
    config with ``privacy.secure_aggregation`` gets no plain ``train`` answered.
    """

    def config_mods(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        handler = call_next
        for mod in reversed(_mods(resolve(context))):
            handler = _chained(mod, handler)
        return handler(message, context)

    def unmasked_refused(
        message: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        if (
            message.metadata.message_type == MessageType.TRAIN
            and resolve(context).privacy.secure_aggregation
        ):
            raise PermissionError(
                "privacy.secure_aggregation = true: a plain train message is refused, "
                "its reply would carry this client's unmasked update"
            )
        return call_next(message, context)

    def clients(context: Context) -> TorchClient:
        return _client(resolve(context))

    app = routed_client_app(clients, [unmasked_refused, config_mods], algorithms=algorithms)
    # Secure aggregation's masked-input exchange trains through an app of plain
    # train and evaluate with the config's mods, so what it masks is what a plain
    # reply would carry (locally privatized, if the config says so).
    SecAggClient(routed_client_app(clients, [config_mods])).register(app)
    return app


@lru_cache(maxsize=4)
def _mods(config: RunConfig) -> list[Mod]:
    mods = client_mods(config)
    check_mods(mods, message_types([strategy_class(config)]))
    return [client_mod.mod for client_mod in mods]


def _chained(mod: Mod, call_next: ClientAppCallable) -> ClientAppCallable:
    return lambda message, context: mod(message, context, call_next)


def server_app_for(
    resolve: ConfigResolver,
    *,
    engine: str,
    summaries: list | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> ServerApp:
    """Build a ServerApp that runs the resolved config on whatever grid Flower provides.

    The run replaces its folder's results if ``overwrite`` or the run config's
    ``overwrite`` key says so (see :func:`fedsim.experiment.run_on_grid`).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = run_on_grid(
            resolve(context),
            grid,
            engine=engine,
            resume=resume,
            overwrite=overwrite or overwrite_of(context.run_config),
        )
        if summaries is not None:
            summaries.append(summary)

    return app


def _from_context(context: Context) -> RunConfig:
    return config_from_run_config(context.run_config)


# Under `flwr run` the config arrives with each message, after the app is built: it
# answers every shipped strategy's actions (a plug-in strategy's need an app of its own,
# `client_app_for(..., algorithms=[MyStrategy])`).
client_app = client_app_for(
    _from_context,
    algorithms=[resolve("strategy.name", name, STRATEGIES) for name in STRATEGIES],
)
server_app = server_app_for(_from_context, engine="flwr-run")
