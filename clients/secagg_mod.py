"""Client side of secure aggregation: four handlers around any train handler.

:class:`SecAggClient` answers the four exchanges of
:class:`fedsim.strategies.secure_aggregation.SecureAggregation` (Bonawitz et al. 2017;
see :mod:`fedsim.privacy.secagg`). In the masked-input exchange it calls the
wrapped train handler, turns the trained model into an update, quantizes and
masks it, and replies *only* the masked vector: the train handler's own reply
(model, loss) never leaves the client.

Handlers under named message types rather than a ``call_next`` mod: Flower routes
a message to its handler by message type *inside* the mod chain, so a mod could
not hand the masked-input exchange to a ``train`` handler without rewriting the
message type. A round's secrets live in ``Context.state``, so they follow a node
to whichever process runs its next exchange, and are deleted after unmasking.
"""

import logging
from collections.abc import Callable, Sequence
from copy import copy
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedsim import keys
from fedsim.arrays import arrays_of, to_array_record
from fedsim.clients.torch_client import TorchClient, TorchTask
from fedsim.privacy.clipping import clip_l2
from fedsim.privacy.flat import flatten
from fedsim.privacy.secagg import wire
from fedsim.privacy.secagg.crypto import agree, new_key_pair, new_seed, open_sealed, seal, share
from fedsim.privacy.secagg.masking import mask
from fedsim.privacy.secagg.quantization import FieldQuantizer
from fedsim.privacy.secagg.wire import read, read_list
from fedsim.records import get_record, records_of
from fedsim.seeding import numpy_rng

logger = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]


@dataclass
class _Secrets:
    """What a client remembers between the exchanges of one round."""

    round: int
    stage: str  # the last exchange answered
    c_sk: bytes  # decrypts the shares others send
    c_pk: bytes
    s_sk: bytes  # derives pairwise masks
    s_pk: bytes
    threshold: int = 0
    nodes: list[int] = field(default_factory=list)  # U1, the clients that advertised keys
    c_pks: list[bytes] = field(default_factory=list)
    s_pks: list[bytes] = field(default_factory=list)
    b: bytes = b""  # the self-mask seed
    share_nodes: list[int] = field(default_factory=list)  # whose shares this client holds
    b_shares: list[bytes] = field(default_factory=list)
    s_shares: list[bytes] = field(default_factory=list)

    def public_keys(self, node: int) -> tuple[bytes, bytes]:
        """Return ``(c_pk, s_pk)`` that ``node`` advertised."""
        index = self.nodes.index(node)
        return self.c_pks[index], self.s_pks[index]


class SecAggClient:
    """The client side of secure aggregation around ``train``, any train handler.

    ``train`` must reply one ArrayRecord (the trained model, same entries as the
    received ``keys.ARRAYS``) and one MetricRecord holding the weight the server
    names (``num-examples`` by default).
    """

    ACTIONS = {
        wire.ADVERTISE_KEYS: "advertise_keys",
        wire.SHARE_KEYS: "share_keys",
        wire.MASKED_INPUT: "masked_input",
        wire.UNMASK: "unmask",
    }

    def __init__(self, train: Handler) -> None:
        self._train = train

    def register(self, app: ClientApp) -> None:
        """Register the four handlers on ``app`` under their message types."""
        for message_type, method in self.ACTIONS.items():
            app.train(message_type.partition(".")[2])(getattr(self, method))

    def advertise_keys(self, message: Message, context: Context) -> Message:
        """Round 0: make this round's two key pairs; reply the public keys."""
        c_sk, c_pk = new_key_pair()
        s_sk, s_pk = new_key_pair()
        secrets = _Secrets(
            round=_round(message),
            stage=wire.ADVERTISE_KEYS,
            c_sk=c_sk,
            c_pk=c_pk,
            s_sk=s_sk,
            s_pk=s_pk,
        )
        _save(context, secrets)
        return _reply(message, {wire.C_PUBLIC_KEY: c_pk, wire.S_PUBLIC_KEY: s_pk})

    def share_keys(self, message: Message, context: Context) -> Message:
        """Round 1: Shamir-share b_u and s_sk_u over U1; reply each share sealed for its holder."""
        secrets = _load(context, message, after=wire.ADVERTISE_KEYS)
        record = get_record(message.content, wire.RECORD, ConfigRecord)
        me = message.metadata.dst_node_id
        secrets.nodes = read_list(record, wire.NODES, int)
        secrets.c_pks = read_list(record, wire.C_PUBLIC_KEYS, bytes)
        secrets.s_pks = read_list(record, wire.S_PUBLIC_KEYS, bytes)
        secrets.threshold = read(record, wire.THRESHOLD, int)
        _check_keys(secrets, me)
        secrets.b = new_seed()
        b_shares = share(secrets.b, secrets.threshold, len(secrets.nodes))
        s_shares = share(secrets.s_sk, secrets.threshold, len(secrets.nodes))
        destinations, ciphertexts = [], []
        for node, c_pk, b_share, s_share in zip(
            secrets.nodes, secrets.c_pks, b_shares, s_shares, strict=True
        ):
            if node == me:
                _keep_shares(secrets, me, b_share, s_share)
            else:
                destinations.append(node)
                ciphertexts.append(seal(agree(secrets.c_sk, c_pk), me, node, b_share, s_share))
        secrets.stage = wire.SHARE_KEYS
        _save(context, secrets)
        return _reply(message, {wire.DESTINATIONS: destinations, wire.CIPHERTEXTS: ciphertexts})

    def masked_input(self, message: Message, context: Context) -> Message:
        """Round 2: keep the shares received, train, reply only the masked, quantized update."""
        secrets = _load(context, message, after=wire.SHARE_KEYS)
        record = get_record(message.content, wire.RECORD, ConfigRecord)
        me = message.metadata.dst_node_id
        sources = read_list(record, wire.SOURCES, int)  # U2 without this client
        if len(sources) + 1 < secrets.threshold:
            raise ValueError(f"{len(sources) + 1} clients left, {secrets.threshold} needed")
        _open_shares(secrets, me, sources, read_list(record, wire.CIPHERTEXTS, bytes))
        quantizer = FieldQuantizer(
            clip_range=read(record, wire.CLIP_RANGE, float),
            levels=read(record, wire.LEVELS, int),
            max_weight=read(record, wire.MAX_WEIGHT, int),
        )
        update, weight = self._contribution(message, context, record, quantizer)
        config = get_record(message.content, keys.CONFIG, ConfigRecord)
        seed = read(config, keys.SEED, int) if keys.SEED in config else 0
        # Seeded by the partition, as every client draw is, not by Flower's node id
        # (random under the deployment engine): the same run rounds the same way anywhere.
        partition = int(context.node_config[keys.PARTITION_ID])
        rng = numpy_rng(seed, secrets.round, partition, "secagg")
        encoded = quantizer.encode(update, weight, rng)
        masked = mask(
            encoded,
            node=me,
            self_seed=secrets.b,
            mask_key=secrets.s_sk,
            peer_keys={source: secrets.public_keys(source)[1] for source in sources},
        )
        secrets.stage = wire.MASKED_INPUT
        _save(context, secrets)
        content = RecordDict({wire.MASKED: to_array_record({wire.MASKED_VECTOR: masked})})
        return Message(content, reply_to=message)

    def unmask(self, message: Message, context: Context) -> Message:
        """Round 4: reply shares of survivors' b_v and of dropped clients' s_sk_v, never both."""
        secrets = _load(context, message, after=wire.MASKED_INPUT)
        record = get_record(message.content, wire.RECORD, ConfigRecord)
        survivors = read_list(record, wire.SURVIVORS, int)
        dropped = read_list(record, wire.DROPPED, int)
        if set(survivors) & set(dropped):
            raise ValueError("a client cannot both survive and drop: refusing to unmask")
        if len(survivors) < secrets.threshold:
            raise ValueError(f"{len(survivors)} survivors, {secrets.threshold} needed")
        held = {node: i for i, node in enumerate(secrets.share_nodes)}
        del context.state[wire.CLIENT_SECRETS]  # this round's secrets are spent
        return _reply(
            message,
            {
                wire.B_NODES: [v for v in survivors if v in held],
                wire.B_SHARES: [secrets.b_shares[held[v]] for v in survivors if v in held],
                wire.S_NODES: [v for v in dropped if v in held],
                wire.S_SHARES: [secrets.s_shares[held[v]] for v in dropped if v in held],
            },
        )

    def _contribution(
        self, message: Message, context: Context, record: ConfigRecord, quantizer: FieldQuantizer
    ) -> tuple[np.ndarray, int]:
        """Train; return what this client masks: its update and its weight.

        Under central DP (``wire.L2_CLIP`` = S) that is the update L2-clipped so
        that even after quantization its norm stays within S, with weight 1;
        otherwise the update as trained, weighted by the metric the server names.
        """
        update, metrics = self._update(message, context)
        if wire.L2_CLIP in record:
            radius = quantizer.safe_l2_radius(read(record, wire.L2_CLIP, float), update.size)
            return clip_l2(update, radius)[0], 1
        weight_key = read(record, wire.WEIGHT_KEY, str)
        weight = metrics[weight_key]
        if not isinstance(weight, int | float) or weight != int(weight):
            raise ValueError(f"weight {weight_key!r} must be a whole number, got {weight!r}")
        if weight > quantizer.max_weight:
            me = message.metadata.dst_node_id
            logger.warning("Node %d: weight %d capped at %d", me, weight, quantizer.max_weight)
        return update, int(weight)

    def _update(self, message: Message, context: Context) -> tuple[np.ndarray, MetricRecord]:
        """Run the wrapped train handler; return trained - received, flat, and its metrics."""
        reply = self._train(_train_view(message), context)
        if reply.has_error():
            raise RuntimeError(f"the train handler failed: {reply.error.reason}")
        (trained_record,) = records_of(reply.content, ArrayRecord).values()
        (metrics,) = records_of(reply.content, MetricRecord).values()
        received = arrays_of(get_record(message.content, keys.ARRAYS, ArrayRecord))
        trained = arrays_of(trained_record)
        start, layout = flatten(received)
        end, trained_layout = flatten({name: trained[name] for name in received})
        if trained_layout.shapes != layout.shapes:
            raise ValueError("the trained model's shapes differ from the received model's")
        return end - start, metrics


def secure_client_app(task: TorchTask, mods: Sequence[Mod] = ()) -> ClientApp:
    """Return a ClientApp that trains ``task`` only under secure aggregation, and evaluates.

    It registers no plain ``train`` handler, so it never sends an unmasked update.
    ``mods`` (Flower client mods) wrap training and evaluation as in
    :func:`fedsim.clients.make_client_app`: training is a ClientApp of its own,
    handed plain ``train`` messages, so a mod that rewrites ``train`` replies
    (``separated_privatization_mod``) rewrites the update that gets masked. The
    protocol's own exchanges are not wrapped: their replies are keys and shares.
    """
    client = TorchClient(task)
    training = ClientApp(mods=list(mods))
    training.train()(client.train)
    app = ClientApp()
    SecAggClient(training).register(app)
    app.evaluate(mods=list(mods))(client.evaluate)
    return app


def _train_view(message: Message) -> Message:
    """Return the masked-input message as the plain ``train`` message a train handler expects.

    Same ids and model, without the protocol's record, typed ``train``: the handler
    and its mods see what they would see in plain training.
    """
    metadata = copy(message.metadata)
    metadata.message_type = MessageType.TRAIN
    content = RecordDict(
        {name: rec for name, rec in message.content.items() if name != wire.RECORD}
    )
    # ``metadata=`` is Flower's internal constructor path (not in its typed overloads).
    return Message(content=content, metadata=metadata)  # type: ignore[call-overload]


def _round(message: Message) -> int:
    return read(get_record(message.content, keys.CONFIG, ConfigRecord), keys.SERVER_ROUND, int)


def _check_keys(secrets: _Secrets, me: int) -> None:
    """Refuse a key list that misquotes ours, repeats a key, or is too short for the threshold."""
    if me not in secrets.nodes or secrets.public_keys(me) != (secrets.c_pk, secrets.s_pk):
        raise ValueError("the server left out or misquoted this client's public keys")
    all_keys = secrets.c_pks + secrets.s_pks
    if len(set(all_keys)) != len(all_keys):
        raise ValueError("two advertised public keys are identical")
    if not 2 <= secrets.threshold <= len(secrets.nodes):
        raise ValueError(f"threshold {secrets.threshold} for {len(secrets.nodes)} clients")


def _open_shares(secrets: _Secrets, me: int, sources: list[int], ciphertexts: list[bytes]) -> None:
    """Decrypt the shares each source sealed for this client, and keep them."""
    for source, ciphertext in zip(sources, ciphertexts, strict=True):
        key = agree(secrets.c_sk, secrets.public_keys(source)[0])
        _keep_shares(secrets, source, *open_sealed(key, ciphertext, source=source, destination=me))


def _keep_shares(secrets: _Secrets, node: int, b_share: bytes, s_share: bytes) -> None:
    secrets.share_nodes.append(node)
    secrets.b_shares.append(b_share)
    secrets.s_shares.append(s_share)


def _reply(message: Message, entries: dict[str, Any]) -> Message:
    return Message(RecordDict({wire.RECORD: ConfigRecord(entries)}), reply_to=message)


def _save(context: Context, secrets: _Secrets) -> None:
    context.state[wire.CLIENT_SECRETS] = ConfigRecord(asdict(secrets))


def _load(context: Context, message: Message, *, after: str) -> _Secrets:
    """Return this round's secrets; raise unless the previous exchange was ``after``."""
    record = records_of(context.state, ConfigRecord).get(wire.CLIENT_SECRETS)
    if record is None:
        raise ValueError(f"{message.metadata.message_type} arrived before {after}")
    secrets = _Secrets(**cast(dict[str, Any], dict(record)))
    if (secrets.round, secrets.stage) != (_round(message), after):
        raise ValueError(
            f"{message.metadata.message_type} of round {_round(message)} arrived after "
            f"{secrets.stage} of round {secrets.round}"
        )
    return secrets
