"""What one run will do before it runs: its plan, and its config as TOML.

``fedsim run --dry-run`` prints the resolved config (:func:`toml_lines`, a TOML
document that loads back) and :func:`plan_run`'s plan: the cohort drawn each
round and the model traffic that cohort costs. Planning builds the task and the
initial model, so a config that would fail to build fails here, and trains nothing.
"""

import json
import math
from dataclasses import dataclass
from typing import Any

from fedsim.config import RunConfig, flatten


@dataclass(frozen=True)
class RunPlan:
    """A run's cohorts and model traffic per round, from its config and its initial model.

    Traffic is counted per exchange of the global model, as the round loop counts
    ``downlink_floats`` and ``uplink_floats``: the training cohort gets the model
    and answers with one, the evaluation cohort gets it and answers with metrics.
    """

    population: int
    train_cohort: int
    evaluate_cohort: int
    poisson: bool  # cohorts of Poisson sampling: sizes vary around these means
    model_floats: int
    model_bytes: int
    multi_exchange: str | None  # a strategy whose rounds are exchanges of its own

    def lines(self) -> list[str]:
        """Describe the plan in a few lines of text."""
        about = "about " if self.poisson else ""
        down = self.train_cohort + self.evaluate_cohort
        lines = [
            f"cohort per round: {about}{self.train_cohort} of {self.population} clients "
            f"train, {about}{self.evaluate_cohort} evaluate",
            f"model: {self.model_floats:,} floats ({_size(self.model_bytes)})",
            f"traffic per round: down {down * self.model_floats:,} floats "
            f"({_size(down * self.model_bytes)}), up {self.train_cohort * self.model_floats:,} "
            f"floats ({_size(self.train_cohort * self.model_bytes)})",
        ]
        if self.multi_exchange:
            lines.append(
                f"note: {self.multi_exchange} trains in exchanges of its own (several a round, "
                "or other arrays than the model); metrics.jsonl counts what each round sent "
                "(downlink_floats, uplink_floats)"
            )
        return lines


def plan_run(config: RunConfig) -> RunPlan:
    """Return the plan of ``config``: builds its task and initial model, runs nothing."""
    from fedsim.algorithm import HoldsServerModel
    from fedsim.composition import strategy_class
    from fedsim.experiment import build_strategy, build_task, initial_arrays

    strategy = build_strategy(config)
    if isinstance(strategy, HoldsServerModel):  # GS-WGAN: the server's generator travels
        arrays = strategy.initial_arrays()
    else:
        arrays = initial_arrays(build_task(config), config.seed)
    privacy = config.privacy
    return RunPlan(
        population=config.data.num_clients,
        train_cohort=config.strategy.clients_per_round,
        evaluate_cohort=config.strategy.evaluate_clients,
        poisson=privacy.central_dp and privacy.sampling == "poisson",
        model_floats=sum(math.prod(array.shape) for array in arrays.values()),
        model_bytes=sum(array.numpy().nbytes for array in arrays.values()),
        multi_exchange=(
            config.strategy.name if hasattr(strategy_class(config), "train_round") else None
        ),
    )


def _size(nbytes: int) -> str:
    """Return ``nbytes`` in decimal units: 520 B, 5.2 kB, 1.3 MB."""
    if nbytes < 1000:
        return f"{nbytes} B"
    exponent = min(int(math.log10(nbytes)) // 3, 3)
    return f"{nbytes / 1000**exponent:.1f} {('kB', 'MB', 'GB')[exponent - 1]}"


def toml_lines(config: RunConfig) -> list[str]:
    """Return the config as dotted ``key = value`` lines: a TOML document that loads back."""
    return [f"{key} = {_toml_value(value)}" for key, value in flatten(config).items()]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):  # a plug-in's params may hold arrays
        return f"[{', '.join(_toml_value(item) for item in value)}]"
    return repr(value)
