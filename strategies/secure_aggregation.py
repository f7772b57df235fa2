r"""Secure aggregation around any mean-based strategy: the server sees only masked sums.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning" (CCS, https://eprint.iacr.org/2017/281), for an honest-but-curious server
(see :mod:`fedsim.privacy.secagg` for what is simplified). The wrapped strategy
picks the cohort and the training message (``configure_train``) and takes the
server step (``aggregate_train``, handed the securely aggregated mean as one
reply), so FedAvg, FedProx or FedAdam run unchanged; strategies that need
individual updates (median, Krum) cannot, by design. A round is four exchanges
(``fedsim.loop``'s ``train_round``); U1 ⊇ U2 ⊇ U3 ⊇ U4 are the clients that
answer each one, and each needs t = max(2, ⌈fraction·n⌉) of the n sampled
clients, else the round stops and the global model stays as it was.

1. ``train.secagg_keys``: the server sends the round's config; client u replies
   two fresh public keys, c_pk_u (to encrypt shares) and s_pk_u (for masks).
2. ``train.secagg_shares``: the server sends U1's ids and public keys and t; u
   Shamir-shares its self-mask seed b_u and its private mask key s_sk_u (t of
   |U1|) and replies, for each v ≠ u, both shares encrypted with KA(c_sk_u, c_pk_v).
3. ``train.secagg_masked``: the server sends the wrapped strategy's training
   content (model, config), the ciphertexts addressed to u by U2, and the
   quantizer (c, L, W); u trains, and replies only y_u: its weighted, quantized
   update and its weight, masked (d + 1 uint32s).
4. ``train.secagg_unmask``: the server sends U3 (survivors) and U2 \ U3 (dropped);
   u replies its shares of b_v for v ∈ U3 and of s_sk_v for v ∈ U2 \ U3.

The server adds each y_u into one running sum as it arrives, rebuilds the self
masks of U3 and the pairwise masks of U2 \ U3 from t shares each, removes them
from the sum, and decodes it into the example-weighted mean update (Δ = trained
- global), weights capped at ``max_weight`` and masked like the update: the
server learns Σ w·Δ and Σ w over U3 and nothing per client; per-client metrics
(train loss) are not sent. Quantization error: below c/L per coordinate
(``fedsim.privacy.secagg.quantization``); coordinates beyond ±c are clipped.

:meth:`SecureSummation.run` runs the four exchanges for any cohort and
returns the unmasked sum; :class:`fedsim.strategies.secure_central_dp.SecureCentralDP`
reuses it with its own cohort, unweighted L2-clipped inputs and central noise.
"""

import logging
import math
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim import keys
from fedsim.arrays import arrays_of
from fedsim.loop import TrainRound
from fedsim.privacy.flat import flatten, unflatten
from fedsim.privacy.secagg import wire
from fedsim.privacy.secagg.crypto import reconstruct
from fedsim.privacy.secagg.masking import unmask
from fedsim.privacy.secagg.quantization import FieldQuantizer, levels_for
from fedsim.privacy.secagg.wire import read, read_list
from fedsim.records import get_record
from fedsim.strategies.aggregation import InvalidReplyError
from fedsim.strategies.fedavg import skip_reply
from fedsim.strategies.multi_exchange import WrapsStrategy

logger = logging.getLogger(__name__)

P = TypeVar("P")


class SecureAggregation(WrapsStrategy):
    """Run ``strategy``'s training under secure aggregation.

    Parameters
    ----------
    strategy
        A one-exchange strategy whose ``aggregate_train`` is a weighted mean of
        the replies' models followed by a server step (FedAvg and its
        descendants). It samples the cohort and runs federated evaluation.
    clip_range, max_weight, threshold_fraction
        As for :class:`SecureSummation`, which runs the protocol's exchanges.

    Clients must run :func:`fedsim.clients.secagg_mod.secure_client_app` (or
    register :class:`~fedsim.clients.secagg_mod.SecAggClient`).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        clip_range: float,
        max_weight: int = 1000,
        threshold_fraction: float = 2 / 3,
    ) -> None:
        self.strategy = strategy
        self.summation = SecureSummation(
            clip_range=clip_range, max_weight=max_weight, threshold_fraction=threshold_fraction
        )

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Run the four exchanges of one round; return the new global arrays, or None."""
        instructions, content = self.training_content(server_round, arrays, config, grid)
        cohort = [message.metadata.dst_node_id for message in instructions]
        start, layout = flatten(arrays_of(arrays))
        outcome = yield from self.summation.run(
            server_round,
            cohort,
            content,
            dim=layout.size,
            contribution={wire.WEIGHT_KEY: self.weight_key},
        )
        if outcome is None:
            return None, None
        try:
            mean, weight = outcome.quantizer.decode(outcome.total)
        except ValueError as exc:
            _failed(server_round, exc)
            return None, None
        new_arrays = self.step_inner(server_round, unflatten(start + mean, layout), weight)
        metrics = outcome.metrics()
        metrics[self.weight_key] = weight
        return new_arrays, metrics


@dataclass(frozen=True, kw_only=True)
class SecureSummation:
    """The server's side of the protocol: four exchanges that end in the cohort's unmasked sum.

    Parameters
    ----------
    clip_range
        c: each coordinate of a client's update is clipped to [-c, c] before
        quantization; the error bound is c/L, L = ⌊(2^31 - 1)/(W·|U2|)⌋.
    max_weight
        W: the most examples one client's update counts for.
    threshold_fraction
        Fraction of the sampled cohort that must answer every exchange.
    """

    clip_range: float
    max_weight: int = 1000
    threshold_fraction: float = 2 / 3

    def __post_init__(self) -> None:
        if not 0 < self.threshold_fraction <= 1:
            raise ValueError(f"threshold_fraction must be in (0, 1], got {self.threshold_fraction}")
        # Check c and W now rather than in the middle of the first round.
        FieldQuantizer(clip_range=self.clip_range, levels=1, max_weight=self.max_weight)

    def threshold(self, cohort_size: int) -> int:
        """Return t: how many clients must answer each exchange (and Shamir's threshold)."""
        return max(2, math.ceil(self.threshold_fraction * cohort_size))

    def run(
        self,
        server_round: int,
        cohort: list[int],
        train_content: RecordDict,
        *,
        dim: int,
        contribution: dict[str, Any],
    ) -> Generator[list[Message], Iterable[Message], "SecureSum | None"]:
        """Run the four exchanges with ``cohort``; return the unmasked sum, or None if stopped.

        ``train_content`` (model and config, see ``WrapsStrategy.training_content``) goes with
        the masked-input exchange, its config with every exchange; ``contribution``
        tells clients what to mask: their weighted update (``wire.WEIGHT_KEY``) or
        their update L2-clipped, with weight 1 (``wire.L2_CLIP``).
        """
        t = self.threshold(len(cohort))
        config = get_record(train_content, keys.CONFIG, ConfigRecord)
        replies = yield self._send(cohort, wire.ADVERTISE_KEYS, {keys.CONFIG: config})
        public_keys = _parsed(replies, cohort, _public_keys)
        if not _enough(server_round, wire.ADVERTISE_KEYS, len(public_keys), t):
            return None

        u1 = sorted(public_keys)
        advertised = _advertised(public_keys, t)
        replies = yield self._send(
            u1, wire.SHARE_KEYS, {keys.CONFIG: config, wire.RECORD: advertised}
        )
        sealed = _parsed(replies, u1, _sealed_for(u1))
        if not _enough(server_round, wire.SHARE_KEYS, len(sealed), t):
            return None

        u2 = sorted(sealed)
        quantizer = FieldQuantizer(
            clip_range=self.clip_range,
            levels=levels_for(len(u2), self.max_weight),
            max_weight=self.max_weight,
        )
        replies = yield [
            self._masked_input_message(train_content, u, sealed, quantizer, contribution)
            for u in u2
        ]
        total, u3 = _masked_sum(replies, u2, dim + 1)
        if not _enough(server_round, wire.MASKED_INPUT, len(u3), t):
            return None

        dropped = [v for v in u2 if v not in u3]
        lists = ConfigRecord({wire.SURVIVORS: u3, wire.DROPPED: dropped})
        replies = yield self._send(u3, wire.UNMASK, {keys.CONFIG: config, wire.RECORD: lists})
        shares = _parsed(replies, u3, _held_shares)
        if not _enough(server_round, wire.UNMASK, len(shares), t):
            return None
        try:
            unmasked = _unmasked(total, shares, public_keys, u3, dropped, t)
        except ValueError as exc:
            _failed(server_round, exc)
            return None
        return SecureSum(unmasked, quantizer, survivors=len(u3), dropped=len(dropped))

    def _send(self, nodes: list[int], message_type: str, records: dict[str, Any]) -> list[Message]:
        """Address one RecordDict of ``records`` to every node of ``nodes``."""
        content = RecordDict(records)
        return [Message(content, node, message_type) for node in nodes]

    def _masked_input_message(
        self,
        train_content: RecordDict,
        node: int,
        sealed: dict[int, dict[int, bytes]],
        quantizer: FieldQuantizer,
        contribution: dict[str, Any],
    ) -> Message:
        """Address the training content, the quantizer and the shares sealed for ``node`` to it."""
        sources = [v for v in sorted(sealed) if v != node]
        record = ConfigRecord(
            {
                wire.SOURCES: sources,
                wire.CIPHERTEXTS: [sealed[v][node] for v in sources],
                wire.CLIP_RANGE: quantizer.clip_range,
                wire.LEVELS: quantizer.levels,
                wire.MAX_WEIGHT: quantizer.max_weight,
                **contribution,
            }
        )
        (message,) = self._send([node], wire.MASKED_INPUT, {**train_content, wire.RECORD: record})
        return message


@dataclass(frozen=True)
class SecureSum:
    """A round's unmasked sum (uint32, as the quantizer encoded it) and who is in it."""

    total: np.ndarray
    quantizer: FieldQuantizer
    survivors: int
    dropped: int

    def metrics(self) -> MetricRecord:
        """Return the round's survivor and dropout counts."""
        return MetricRecord(
            {wire.SURVIVORS_METRIC: self.survivors, wire.DROPPED_METRIC: self.dropped}
        )


def _failed(server_round: int, exc: ValueError) -> None:
    logger.warning("Round %d: secure aggregation failed: %s; model kept", server_round, exc)


def _parsed(
    replies: Iterable[Message], expected: list[int], parse: Callable[[int, ConfigRecord], P]
) -> dict[int, P]:
    """Return ``parse(sender, record)`` for each valid reply's protocol record; skip the rest.

    ``parse`` raises ``KeyError``, ``TypeError`` or ``ValueError`` on a malformed record.
    """
    parsed = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        try:
            if reply.has_error():
                raise ValueError(reply.error.reason or f"error code {reply.error.code}")
            if node not in expected:
                raise KeyError(f"node {node} is not part of this exchange")
            parsed[node] = parse(node, get_record(reply.content, wire.RECORD, ConfigRecord))
        except (KeyError, TypeError, ValueError) as exc:
            skip_reply(reply, str(exc))
    return parsed


def _public_keys(_node: int, record: ConfigRecord) -> tuple[bytes, bytes]:
    """Parse an advertised ``(c_pk, s_pk)``."""
    return read(record, wire.C_PUBLIC_KEY, bytes), read(record, wire.S_PUBLIC_KEY, bytes)


def _sealed_for(u1: list[int]) -> Callable[[int, ConfigRecord], dict[int, bytes]]:
    """Return a parser of a client's sealed shares: destination -> ciphertext, one per U1 peer."""

    def parse(node: int, record: ConfigRecord) -> dict[int, bytes]:
        destinations = read_list(record, wire.DESTINATIONS, int)
        if sorted(destinations) != [v for v in u1 if v != node]:
            raise ValueError("its shares are not addressed to the other clients of U1")
        return dict(zip(destinations, read_list(record, wire.CIPHERTEXTS, bytes), strict=True))

    return parse


@dataclass(frozen=True)
class _HeldShares:
    """The shares one client of U4 returned: of b_v (survivors) and of s_sk_v (dropped)."""

    b: dict[int, bytes]
    s: dict[int, bytes]


def _held_shares(_node: int, record: ConfigRecord) -> _HeldShares:
    """Parse an unmask reply."""
    b_nodes, s_nodes = read_list(record, wire.B_NODES, int), read_list(record, wire.S_NODES, int)
    return _HeldShares(
        b=dict(zip(b_nodes, read_list(record, wire.B_SHARES, bytes), strict=True)),
        s=dict(zip(s_nodes, read_list(record, wire.S_SHARES, bytes), strict=True)),
    )


def _masked_sum(
    replies: Iterable[Message], expected: list[int], size: int
) -> tuple[np.ndarray, list[int]]:
    """Fold each valid masked input into one sum mod 2^32; return it and its senders."""
    total, senders = np.zeros(size, dtype=np.uint32), []
    for reply in replies:
        try:
            if reply.has_error():
                raise InvalidReplyError(reply.error.reason or f"error code {reply.error.code}")
            total += _masked_vector(reply, expected, size)
        except (InvalidReplyError, KeyError) as exc:
            skip_reply(reply, str(exc))
            continue
        senders.append(reply.metadata.src_node_id)
    return total, sorted(senders)


def _enough(server_round: int, exchange: str, answered: int, needed: int) -> bool:
    """Whether the round can go on; if not, say so in one line."""
    if answered >= needed:
        return True
    logger.warning(
        "Round %d: secure aggregation stopped at %s: %d clients answered, %d needed; model kept",
        server_round,
        exchange,
        answered,
        needed,
    )
    return False


def _advertised(keys: dict[int, tuple[bytes, bytes]], threshold: int) -> ConfigRecord:
    """Return the record of the share-keys exchange: U1's ids and public keys, and t."""
    u1 = sorted(keys)
    return ConfigRecord(
        {
            wire.NODES: u1,
            wire.C_PUBLIC_KEYS: [keys[u][0] for u in u1],
            wire.S_PUBLIC_KEYS: [keys[u][1] for u in u1],
            wire.THRESHOLD: threshold,
        }
    )


def _unmasked(
    total: np.ndarray,
    shares: dict[int, _HeldShares],
    keys: dict[int, tuple[bytes, bytes]],
    survivors: list[int],
    dropped: list[int],
    threshold: int,
) -> np.ndarray:
    """Rebuild the survivors' self seeds and the dropped clients' mask keys; unmask the sum."""
    b_holders = [held.b for held in shares.values()]
    s_holders = [held.s for held in shares.values()]
    return unmask(
        total,
        self_seeds=[_rebuilt(b_holders, u, threshold) for u in survivors],
        dropped_keys={v: _rebuilt(s_holders, v, threshold) for v in dropped},
        survivor_keys={u: keys[u][1] for u in survivors},
    )


def _rebuilt(holders: list[dict[int, bytes]], node: int, threshold: int) -> bytes:
    """Rebuild ``node``'s secret from the shares of it that U4 returned."""
    return reconstruct([held[node] for held in holders if node in held], threshold)


def _masked_vector(reply: Message, expected: list[int], size: int) -> np.ndarray:
    """Return a reply's masked input, checking its sender, dtype and length."""
    if reply.metadata.src_node_id not in expected:
        raise InvalidReplyError(f"node {reply.metadata.src_node_id} shared no keys")
    vector = arrays_of(get_record(reply.content, wire.MASKED, ArrayRecord))[wire.MASKED_VECTOR]
    if vector.dtype != np.uint32 or vector.shape != (size,):
        raise InvalidReplyError(
            f"masked input is {vector.dtype}{vector.shape}, not uint32({size},)"
        )
    return vector
