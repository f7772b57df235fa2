"""Run configuration: frozen dataclasses, parsed and validated once at the edge.

A run is described by a TOML file (or Flower's flat ``run_config``, or
``--set key=value`` overrides); :func:`parse_config` turns it into a
:class:`RunConfig` or raises :class:`ConfigError`, whose message is one line
naming the key, the value and what is allowed. Library code only ever sees the
typed, validated result.
"""

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedsim.config_fields import (
    ConfigError,
    Params,
    at_least,
    build_dataclass,
    fraction,
    positive,
    rule,
)

Partitioner = Literal["iid", "dirichlet", "shards", "qsplit", "natural"]
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, and how it is split over clients.

    ``dataset`` is a shipped one or a loader by import path ``"module:function"``
    returning a ``fedsim.data.datasets.CentralDataset``; it gets ``params`` as
    keyword arguments, plus ``seed`` and ``test_fraction`` if it takes them, and
    its train split is partitioned like a shipped dataset's.

    ``load_partition`` (``"module:function"``) gives each node its own data
    instead: the function gets the node's whole ``node_config`` (a SuperNode's
    ``--node-config``) and returns a ``torch.utils.data.Dataset`` of (input,
    target) pairs. ``dataset`` still gives the server's test split and the
    model's input shape and classes.
    """

    # A shipped dataset (docs/models-and-data.md) or a loader 'module:function'.
    dataset: str = "digits"
    # How the train split is divided over clients; 'natural': the dataset's own clients.
    partitioner: Partitioner = "dirichlet"
    # The population: one partition, one simulated node, per client.
    num_clients: int = at_least(100, 1)
    # Dirichlet concentration of the 'dirichlet' label skew (small: more skewed).
    alpha: float = positive(0.5)
    # Label-sorted shards each client gets under 'shards'.
    shards_per_client: int = at_least(2, 1)
    # The i.i.d. fraction of "qsplit" (our reconstruction of Murata & Suzuki's q).
    q: float = rule(0.0, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    # The server's held-out test split (the Hub datasets keep their own).
    test_fraction: float = fraction(0.2)
    # Synthetic(alpha, beta): variance of the clients' model prior.
    synthetic_alpha: float = rule(1.0, lambda v: v >= 0, "a number >= 0")
    # Synthetic(alpha, beta): variance of the clients' input prior.
    synthetic_beta: float = rule(1.0, lambda v: v >= 0, "a number >= 0")
    # A dataset loader's keyword arguments (import paths only).
    params: Params = field(default_factory=Params)
    # Each node's own data: a function of its node_config ('module:function').
    load_partition: str = ""

    def __post_init__(self) -> None:
        from fedsim.registry import NATURAL_SPLITS, ONLY_NATURAL  # it imports ConfigError

        if self.partitioner == "natural" and self.dataset not in NATURAL_SPLITS:
            raise ConfigError(
                f"data.partitioner = 'natural' applies to datasets split by their own clients "
                f"({', '.join(sorted(NATURAL_SPLITS))}); got dataset={self.dataset!r}"
            )
        if self.dataset in ONLY_NATURAL and self.partitioner != "natural":
            raise ConfigError(
                f"data.partitioner: the {self.dataset!r} dataset is split by client "
                f"('natural'); got dataset={self.dataset!r}, partitioner={self.partitioner!r}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Which model to train: one of the zoo (``fedsim.models``), or a factory ``"module:function"``.

    The factory gets ``params`` as keyword arguments (a zoo model's knobs, e.g.
    ``hidden`` or ``depth``), plus ``input_shape`` and ``num_classes`` if it takes them.
    """

    # A zoo model (docs/models-and-data.md) or a factory 'module:function'.
    name: str = "cnn"
    # The factory's keyword arguments, e.g. { hidden = 128 }.
    params: Params = field(default_factory=Params)


@dataclass(frozen=True)
class ClientConfig:
    """Local training on each client."""

    # Learning rate of the clients' SGD.
    lr: float = positive(0.05)
    # Passes over the local data per round (FedAvg).
    local_epochs: int = at_least(1, 1)
    # Minibatch size of local training.
    batch_size: int = at_least(32, 1)
    dp_sgd: bool = False  # record-level DP-SGD (Opacus) on each client
    # DP-SGD: Gaussian noise std as a multiple of dp_max_grad_norm.
    dp_noise_multiplier: float = rule(1.0, lambda v: v >= 0, "a number >= 0")
    # DP-SGD: per-sample gradient clipping norm.
    dp_max_grad_norm: float = positive(1.0)
    # DP-SGD: the delta at which each node's epsilon is reported.
    dp_delta: float = fraction(1e-5)
    # Where local training runs; 'auto' takes CUDA, then MPS, then CPU.
    device: str = rule(
        "cpu", lambda v: bool(_DEVICE.fullmatch(v)), "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
    )
    # 'auto': the dataset's task decides (cross-entropy for labels, mse for regression);
    # or 'cross-entropy', 'mse', or a batch-mean loss by import path 'module:attribute'.
    loss: str = "auto"


@dataclass(frozen=True)
class StrategyConfig:
    """The server's strategy and its cohorts: a shipped one, or a class ``"module:Class"``.

    A class by import path gets ``params`` as keyword arguments, plus the run's
    ``seed`` and cohort sizes for those of ``fedsim.registry.COHORT_KEYWORDS`` it takes.
    """

    # A shipped strategy (docs/strategies.md) or a class 'module:Class'.
    name: str = "fedavg"
    # The training cohort drawn each round.
    clients_per_round: int = at_least(10, 1)
    # The federated evaluation cohort each round (0: none).
    evaluate_clients: int = at_least(0, 0)
    # The gradient-based strategies (all but fedavg) take K local steps of
    # client.batch_size samples (b; B for minibatch-sgd and sarah) at client.lr.
    local_steps: int = at_least(1, 1)
    # BVR-L-SGD and SARAH: T, rounds per stage (a reference gradient at each start).
    stage_rounds: int = at_least(10, 1)
    # BVR-L-SGD and SARAH: samples of the stage's reference gradient.
    reference_batch_size: int = rule(0, lambda v: v >= 0, "an integer >= 0 (0: full local data)")
    # SCAFFOLD's global step size eta_g.
    server_lr: float = positive(1.0)
    # A plug-in strategy's keyword arguments (and gs-wgan's).
    params: Params = field(default_factory=Params)


@dataclass(frozen=True)
class PrivacyConfig:
    """Central DP and secure aggregation (wrappers around the strategy), local privatization.

    Secure aggregation clips each coordinate of an update to ``secagg_clip_range``
    (under central DP the clip norm takes its place), counts a client's update for
    at most ``secagg_max_weight`` examples, and needs ``secagg_threshold`` of the
    cohort to answer each of its four exchanges.
    """

    # Clip each update, release the cohort's sum with Gaussian noise, account epsilon.
    central_dp: bool = False
    # Central DP: noise std on the sum as a multiple of clip_norm.
    noise_multiplier: float = rule(1.0, lambda v: v >= 0, "a number >= 0")
    # Central DP: L2 bound on each client's update.
    clip_norm: float = positive(0.1)
    # Central DP: how the cohort is drawn, as the accountant assumes it.
    sampling: Literal["poisson", "fixed"] = "poisson"
    # Central DP: Renyi DP or the PRV accountant.
    accountant: Literal["rdp", "prv"] = "rdp"
    # Central DP: the delta at which the run's epsilon is reported.
    delta: float = fraction(1e-5)
    # Central DP: adapt clip_norm to a quantile of update norms (Andrew et al.).
    adaptive_clipping: bool = False
    # Central DP: calibrate the noise for this many clients per round.
    noise_cohort_size: int = rule(0, lambda v: v >= 0, "an integer >= 0 (0: the cohort)")
    # Central DP: account epsilon for this population.
    accounting_population: int = rule(0, lambda v: v >= 0, "an integer >= 0 (0: the population)")
    # Privatize every update on the device: PrivUnit2 direction + ScalarDP magnitude.
    local_dp: bool = False
    # Local DP: epsilon of the PrivUnit2 direction.
    epsilon_direction: float = positive(8.0)
    # Local DP: epsilon of the ScalarDP magnitude.
    epsilon_magnitude: float = positive(2.0)
    # Local DP: L2 bound on an update before it is privatized.
    local_clip: float = positive(1.0)
    # Local DP: levels of ScalarDP's quantized magnitude.
    magnitude_levels: int = at_least(10, 1)
    # The server sees only the cohort's masked sum (Bonawitz et al. 2017).
    secure_aggregation: bool = False
    secagg_clip_range: float = positive(1.0)
    secagg_max_weight: int = at_least(1000, 1)
    secagg_threshold: float = rule(2 / 3, lambda v: 0 < v <= 1, "a number in (0, 1]")


@dataclass(frozen=True)
class EngineConfig:
    """What executes the clients.

    ``check_finite_arrays`` turns a reply whose arrays hold a NaN or an Inf into an
    error reply (fedsim's engines; Flower's runtimes pass them on). ``torch_threads``
    is the inline and vmap engines' torch thread count (0: torch's default, one per
    core); the threads and Ray engines take theirs from ``num_cpus_per_client``. The
    vmap engine trains a cohort as one batched computation (``fedsim.engine.vmap``).
    """

    # What runs the clients: fedsim's engines, or Flower's run_simulation.
    name: Literal["inline", "threads", "vmap", "ray", "flower"] = "inline"
    # Per exchange; unfinished clients become error replies.
    timeout_s: float = positive(3600.0)
    # CPUs per simulated client (Ray; threads: torch threads per worker).
    num_cpus_per_client: float = positive(1.0)
    # GPUs per simulated client on Ray; fractions share a GPU.
    num_gpus_per_client: float = rule(
        0.0, lambda v: v >= 0, "a number >= 0 (fractions share a GPU)"
    )
    # Clients that run at once: Ray actors or worker threads (0: fit the CPUs).
    num_actors: int = at_least(0, 0)
    # '': start a local Ray; 'auto' or 'ray://host:10001' joins a cluster.
    address: str = ""
    # Fix glibc's malloc thresholds for the run and its Ray workers.
    pin_malloc: bool = True
    check_finite_arrays: bool = True
    torch_threads: int = at_least(0, 0)
    # vmap: clients trained at once (0: from the device's free memory).
    vmap_chunk: int = at_least(0, 0)

    @property
    def ray_address(self) -> str | None:
        """Ray address to join; ``None`` starts a local Ray instance."""
        return self.address or None


@dataclass(frozen=True)
class DevicesConfig:
    """Simulated device heterogeneity: speed, availability, bandwidth, a round deadline."""

    # Simulate device heterogeneity around any engine.
    enabled: bool = False
    # Profiles from a CSV (partition_id,speed,availability,bandwidth_mbps).
    csv: str = ""
    # Speed ~ LogNormal(0, sigma).
    speed_sigma: float = rule(0.5, lambda v: v >= 0, "a number >= 0")
    # Availability ~ Beta with this mean.
    availability_mean: float = rule(0.9, lambda v: 0 < v <= 1, "a number in (0, 1]")
    # Availability ~ Beta with this concentration.
    availability_concentration: float = positive(10.0)
    # Bandwidth ~ LogNormal around this median.
    bandwidth_median_mbps: float = positive(20.0)
    # Bandwidth's LogNormal sigma.
    bandwidth_sigma: float = rule(1.0, lambda v: v >= 0, "a number >= 0")
    # Round deadline in simulated seconds; later replies count as late.
    deadline_s: float = rule(0.0, lambda v: v >= 0, "a number >= 0 (0: no deadline)")


@dataclass(frozen=True)
class FaultsConfig:
    """Faults injected on purpose, counted per kind (``fedsim.faults``; off by default).

    ``kinds`` is a comma-separated list of ``raise``, ``hang``, ``nan``, ``inf``,
    ``shape``, ``dtype``, ``huge``, ``missing`` and (on the Ray engine) ``kill``.
    """

    # Fraction of the clients sampled for training that fault each round (0: none).
    fraction: float = rule(0.0, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    # What a faulty client does, drawn uniformly per faulty client and round.
    kinds: str = "raise"
    # How long a 'hang' sleeps; it must exceed engine.timeout_s.
    hang_s: float = positive(5.0)

    @property
    def kind_list(self) -> tuple[str, ...]:
        """``kinds`` split at its commas."""
        return tuple(kind.strip() for kind in self.kinds.split(",") if kind.strip())

    def __post_init__(self) -> None:
        from fedsim.faults import FAULT_KINDS  # it imports records, not this module

        for kind in self.kind_list:
            if kind not in FAULT_KINDS:
                close = difflib.get_close_matches(kind, FAULT_KINDS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"faults.kinds: {kind!r} is not a fault{hint}; choose from "
                    f"{', '.join(FAULT_KINDS)}"
                )


@dataclass(frozen=True)
class LoggingConfig:
    """Metric sinks beside ``metrics.jsonl`` (``fedsim.sinks``; off by default).

    Each logs every round's numbers at step = round under the run's folder, and
    needs its extra (``pip install 'fedsim[tensorboard]'``, ``'fedsim[wandb]'``,
    ``'fedsim[mlflow]'``): a missing one stops the run before any work. W&B and
    MLflow name the project (experiment) ``fedsim`` and the run after ``name``.
    """

    # TensorBoard event files in the run folder's tb/ (tensorboard --logdir runs/).
    tensorboard: bool = False
    # A Weights & Biases run in offline mode, in the run folder's wandb/ (upload: wandb sync).
    wandb: bool = False
    # An MLflow run in a local file store, the run folder's mlruns/.
    mlflow: bool = False


@dataclass(frozen=True)
class RunConfig:
    """A whole run; see ``experiments/configs/*.toml`` for annotated examples."""

    # The run's folder under output_dir.
    name: str = rule("fedsim", lambda v: bool(_NAME.fullmatch(v)), "letters, digits, '.', '_', '-'")
    # Every random draw derives from (seed, round, node, purpose).
    seed: int = at_least(0, 0)
    # Rounds to run (a resumed run continues up to it).
    rounds: int = at_least(10, 1)
    # Central evaluation every N rounds (always at 0 and the last).
    eval_every: int = at_least(1, 1)
    # Where run folders go.
    output_dir: str = "runs"
    # Write metrics.png.
    plot: bool = True
    # Show the live progress bar.
    progress: bool = True
    # Rounds between checkpoints; --resume continues from the last.
    checkpoint_every: int = rule(
        1, lambda v: v >= 0, "an integer >= 0 (rounds between checkpoints; 0: none)"
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        for key in ("clients_per_round", "evaluate_clients"):
            if getattr(self.strategy, key) > self.data.num_clients:
                raise ConfigError(
                    f"strategy.{key} = {getattr(self.strategy, key)} exceeds "
                    f"data.num_clients = {self.data.num_clients}"
                )
        kinds = self.faults.kind_list if self.faults.fraction > 0 else ()
        if "kill" in kinds and self.engine.name != "ray":
            raise ConfigError(
                f"faults.kinds: 'kill' kills the client's worker process, which only the Ray "
                f"engine has; engine.name = {self.engine.name!r} runs clients in this process"
            )
        if "hang" in kinds and self.faults.hang_s <= self.engine.timeout_s:
            raise ConfigError(
                f"faults.hang_s = {self.faults.hang_s} must exceed engine.timeout_s = "
                f"{self.engine.timeout_s} for a 'hang' to time out"
            )

    @property
    def run_dir(self) -> Path:
        """Where this run's metrics, summary and plot go."""
        return Path(self.output_dir) / self.name


def parse_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a nested mapping (a parsed TOML document) into a :class:`RunConfig`.

    Beyond each value, the whole is checked as it will be built: plug-ins import
    and take their ``params``, and every privacy option asked for is one the
    strategy honours (``fedsim.composition``).
    """
    config = build_dataclass(RunConfig, raw, prefix="")
    from fedsim.composition import check_composition  # imports the strategy classes

    check_composition(config)
    return config


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML file, apply ``key=value`` overrides, and validate."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(raw, key, value)
    return parse_config(raw)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Turn Flower's flat ``run_config`` (``{"data.num_clients": 10}``) into nested tables."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        _set_dotted(nested, key, value)
    return nested


def flatten(config: RunConfig) -> dict[str, Any]:
    """Return the config as Flower's flat ``run_config`` (inverse of :func:`unflatten`)."""
    return _flat(dataclasses.asdict(config), prefix="")


def _flat(tree: Mapping[str, Any], *, prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, prefix=f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set rounds=5")
    try:
        return key.strip(), tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value.strip()  # a bare word is a string: --set data.dataset=digits


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = tree.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part!r} is a value, not a table")
        tree = child
    tree[leaf] = value
