"""The wire format of fedsim's secure aggregation: message types, record entries, typed reads.

The server (:mod:`fedsim.strategies.secure_aggregation`) and the client
(:mod:`fedsim.clients.secagg_mod`) agree on these strings, as they agree on
:mod:`fedsim.keys` for plain training. Actions are Python identifiers (Flower's
rule for ``<category>.<action>``), so they use underscores where fedsim's record
entries use hyphens. Each side reads the other's entries with :func:`read` and
:func:`read_list`, which check types: a malformed message fails its check (the
server skips the reply; a client answers with an error) instead of failing later.
"""

from typing import Final, TypeVar, cast

from flwr.app import ConfigRecord

T = TypeVar("T", int, float, str, bytes)

# Message types of the four exchanges of a round: rounds 0, 1, 2 and 4 of Bonawitz et
# al. 2017 (round 3, the consistency check, is omitted: see the package docstring).
ADVERTISE_KEYS: Final = "train.secagg_keys"
SHARE_KEYS: Final = "train.secagg_shares"
MASKED_INPUT: Final = "train.secagg_masked"
UNMASK: Final = "train.secagg_unmask"

# The ConfigRecord that carries the protocol's data both ways, and the ArrayRecord
# that carries a client's masked input.
RECORD: Final = "secagg"
MASKED: Final = "secagg-masked"
MASKED_VECTOR: Final = "masked"

# Entries of RECORD. Public keys: "c" encrypts the shares, "s" derives pairwise masks.
C_PUBLIC_KEY: Final = "c-pk"
S_PUBLIC_KEY: Final = "s-pk"
NODES: Final = "nodes"
C_PUBLIC_KEYS: Final = "c-pks"
S_PUBLIC_KEYS: Final = "s-pks"
THRESHOLD: Final = "threshold"
DESTINATIONS: Final = "destinations"
SOURCES: Final = "sources"
CIPHERTEXTS: Final = "ciphertexts"
CLIP_RANGE: Final = "clip-range"
LEVELS: Final = "levels"
MAX_WEIGHT: Final = "max-weight"
# What a client masks: its update weighted by the reply metric WEIGHT_KEY names, or
# (central DP) its update clipped to L2 norm L2_CLIP, with weight 1.
WEIGHT_KEY: Final = "weight-key"
L2_CLIP: Final = "l2-clip"
SURVIVORS: Final = "survivors"
DROPPED: Final = "dropped"
B_NODES: Final = "b-nodes"
B_SHARES: Final = "b-shares"
S_NODES: Final = "s-nodes"
S_SHARES: Final = "s-shares"

# MetricRecord entries of a round's result (with the strategy's weight, Σ w).
SURVIVORS_METRIC: Final = "secagg-survivors"
DROPPED_METRIC: Final = "secagg-dropped"

# Context.state entry where a client keeps its secrets between a round's exchanges.
CLIENT_SECRETS: Final = "fedsim.secagg"


def read(record: ConfigRecord, name: str, kind: type[T]) -> T:
    """Return entry ``name`` of ``record``, which must be a ``kind``."""
    value = record[name]
    if not isinstance(value, kind):
        raise TypeError(f"entry {name!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def read_list(record: ConfigRecord, name: str, kind: type[T]) -> list[T]:
    """Return entry ``name`` of ``record``, which must be a list of ``kind``."""
    value = record[name]
    if not isinstance(value, list) or not all(isinstance(item, kind) for item in value):
        raise TypeError(f"entry {name!r} must be a list of {kind.__name__}")
    return cast(list[T], value)
