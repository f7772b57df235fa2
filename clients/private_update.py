"""Apple-style local privatization of a client's update, as a Flower client mod.

Bhowmick et al. 2018 (arXiv 1812.00984): before the update leaves the device it
is clipped to ``clip_radius``, split into direction and magnitude, and sent as
R̂·Z with Z = PrivUnit2(direction; ε₁) and R̂ = ScalarDP(norm; ε₂, k levels)
(``fedsim.privacy.separated``). The reply still carries a model (the global
model plus the privatized update), so every server-side strategy reads it as
usual; E[R̂·Z] is the clipped update, so the server's plain mean is unbiased.
Wrap the strategy in ``fedsim.strategies.CentralDP`` to add central DP on top:
it clips what it receives to S, so ``S >= norm_bound(settings, d)`` keeps the
mean unbiased (every privatized update is within that bound), while a smaller S
trades that bias for less central noise.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedsim import keys
from fedsim.arrays import arrays_of, to_array_record
from fedsim.privacy.flat import flatten, unflatten
from fedsim.privacy.privunit import PrivUnitParams, calibrate_privunit
from fedsim.privacy.scalar_dp import ScalarDPParams
from fedsim.privacy.separated import privatize_separated
from fedsim.records import config_number, get_record, records_of
from fedsim.seeding import numpy_rng

LDP_EPSILON = "ldp-epsilon"


@dataclass(frozen=True)
class SeparatedPrivatization:
    """Local budgets ε₁ (direction), ε₂ (magnitude), the clip radius and ScalarDP's levels k."""

    epsilon_direction: float
    epsilon_magnitude: float
    clip_radius: float
    levels: int = 10

    @property
    def magnitude(self) -> ScalarDPParams:
        """ScalarDP's parameters."""
        return ScalarDPParams(self.epsilon_magnitude, self.levels, self.clip_radius)


@lru_cache(maxsize=8)
def _direction(epsilon: float, dim: int) -> PrivUnitParams:
    # The optimal-γ search runs once per (ε, d) and process, not once per client.
    return calibrate_privunit(epsilon=epsilon, dim=dim)


def norm_bound(settings: SeparatedPrivatization, dim: int) -> float:
    """Return the largest norm a privatized update can have: max |R̂| · 1/m."""
    magnitude = settings.magnitude
    largest = float(np.max(np.abs(magnitude.outputs())))
    return float(largest * _direction(settings.epsilon_direction, dim).inv_m)


def separated_privatization_mod(settings: SeparatedPrivatization) -> Mod:
    """Return a mod privatizing every ``train`` reply's update before it leaves the client."""

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        if message.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        global_vector, layout = flatten(
            arrays_of(get_record(message.content, keys.ARRAYS, ArrayRecord))
        )
        local_vector, local_layout = flatten(
            arrays_of(get_record(reply.content, keys.ARRAYS, ArrayRecord))
        )
        if local_layout != layout:
            raise ValueError("the reply's arrays differ from the global model's")
        config = records_of(message.content, ConfigRecord).get(keys.CONFIG, ConfigRecord())
        rng = numpy_rng(
            config_number(config, keys.SEED, int, 0),
            config_number(config, keys.SERVER_ROUND, int, 0),
            int(context.node_config[keys.PARTITION_ID]),
            "separated-privatization",
        )
        private = privatize_separated(
            local_vector - global_vector,
            direction=_direction(settings.epsilon_direction, layout.size),
            magnitude=settings.magnitude,
            rng=rng,
        )
        reply.content[keys.ARRAYS] = to_array_record(unflatten(global_vector + private, layout))
        metrics = get_record(reply.content, keys.METRICS, MetricRecord)
        metrics[LDP_EPSILON] = settings.epsilon_direction + settings.epsilon_magnitude
        return reply

    return mod
