"""Secure aggregation (spec §3, Bonawitz et al. 2017): exact sums, dropouts, what the server sees.

Ten clients train a small MLP on synthetic partitions of different sizes, so
FedAvg's weights differ. Every comparison allows the stated quantization bound
c/L, L = ⌊(2^31 - 1)/(W·n)⌋, plus float32 rounding of the final model.
"""

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

from fedsim import keys
from fedsim.arrays import arrays_of
from fedsim.clients import TorchClient, TorchTask, make_client_app
from fedsim.clients.secagg_mod import SecAggClient, secure_client_app
from fedsim.engine import InlineGrid
from fedsim.engine.execute import assign_message_id, error_reply
from fedsim.engine.threaded import ThreadedGrid
from fedsim.loop import RoundReport, run_rounds
from fedsim.privacy.flat import flatten
from fedsim.privacy.secagg import wire
from fedsim.privacy.secagg.crypto import (
    agree,
    new_key_pair,
    new_seed,
    open_sealed,
    prg,
    reconstruct,
    seal,
    share,
)
from fedsim.privacy.secagg.masking import mask, unmask
from fedsim.privacy.secagg.quantization import MODULUS, FieldQuantizer, levels_for
from fedsim.records import records_of
from fedsim.seeding import numpy_rng
from fedsim.strategies import FedAvg
from fedsim.strategies.secure_aggregation import SecureAggregation, SecureSummation

N = 10
CLIP = 1.0
MAX_WEIGHT = 100
FIRST_NODE = 2  # InlineGrid's node ids are 2, ..., N + 1
BOUND = CLIP / levels_for(N, MAX_WEIGHT)  # c/L; L counts U2, which is all N clients here
FLOAT32_SLACK = 1e-7  # rounding the new global model (entries of size < 1) to float32


# Tiny models: a second torch thread only contends with whatever else runs.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def partition(index: int, _num: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(index)
    size = 8 + 3 * index
    return TensorDataset(
        torch.randn(size, 20, generator=generator),
        torch.randint(0, 3, (size,), generator=generator),
    )


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))


TASK = TorchTask(
    model_fn=model, loss_fn=nn.CrossEntropyLoss(), load_partition=partition, lr=0.1, batch_size=8
)
WEIGHTS = {FIRST_NODE + i: len(partition(i, N)) for i in range(N)}


def initial_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(model().state_dict())


def everyone() -> dict:
    return {
        "fraction_train": 1.0,
        "min_train_nodes": N,
        "fraction_evaluate": 0.0,
        "min_evaluate_nodes": 0,
        "min_available_nodes": N,
    }


class ServerView(InlineGrid):
    """An InlineGrid that records every reply the strategy receives and drops chosen nodes.

    ``drop`` maps a message type to the nodes that do not answer it (their
    replies are NODE_UNAVAILABLE errors and their handler never runs).
    """

    def __init__(self, app: ClientApp, drop: dict[str, set[int]] | None = None) -> None:
        super().__init__(app, num_nodes=N)
        self.drop = drop or {}
        self.replies: list[tuple[str, Message]] = []

    def stream_replies(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        for message in messages:
            kind = message.metadata.message_type
            if message.metadata.dst_node_id in self.drop.get(kind, set()):
                assign_message_id(message)
                reply = error_reply(message, ErrorCode.NODE_UNAVAILABLE, "dropped out")
            else:
                (reply,) = super().stream_replies([message], timeout=timeout)
            self.replies.append((kind, reply))
            yield reply


def recording_app(trained: dict[int, dict[str, np.ndarray]]) -> ClientApp:
    """A secure ClientApp whose train handler also records each node's trained model."""
    client = TorchClient(TASK)

    def train(message: Message, context: Context) -> Message:
        reply = client.train(message, context)
        (record,) = records_of(reply.content, ArrayRecord).values()
        trained[message.metadata.dst_node_id] = {k: v.copy() for k, v in arrays_of(record).items()}
        return reply

    app = ClientApp()
    SecAggClient(train).register(app)
    return app


def secure(wrapper: type[SecureAggregation]) -> SecureAggregation:
    return wrapper(FedAvg(**everyone()), clip_range=CLIP, max_weight=MAX_WEIGHT)


def run_secure(grid: InlineGrid, *, seed: int = 0, strategy: SecureAggregation | None = None):
    """Run one round; return the new arrays and the round's report."""
    reports: list[RoundReport] = []

    class Keep:
        def on_round(self, report: RoundReport) -> None:
            reports.append(report)

    final = run_rounds(
        strategy=strategy or secure(SecureAggregation),
        grid=grid,
        initial_arrays=initial_arrays(),
        num_rounds=1,
        train_config=ConfigRecord({keys.SEED: seed}),
        observers=[Keep()],
    )
    return arrays_of(final), reports[-1]


def weighted_mean(trained: dict[int, dict[str, np.ndarray]], nodes: Iterable[int]) -> dict:
    nodes = list(nodes)
    total = sum(WEIGHTS[u] for u in nodes)
    return {
        name: sum(WEIGHTS[u] * trained[u][name].astype(np.float64) for u in nodes) / total
        for name in trained[nodes[0]]
    }


def assert_within_bound(actual: dict, expected: dict, bound: float) -> None:
    for name in expected:
        error = np.max(np.abs(actual[name].astype(np.float64) - expected[name]))
        assert error <= bound + FLOAT32_SLACK, (name, error, bound)


def max_update(trained: dict[int, dict[str, np.ndarray]]) -> float:
    start = arrays_of(initial_arrays())
    return max(np.max(np.abs(t[k] - start[k])) for t in trained.values() for k in start)


# ---------------------------------------------------------------- end to end


def test_the_threads_engine_aggregates_the_same_bits_as_inline() -> None:
    # Masks, keys and quantization noise come from per-node seeds, never from timing;
    # the workers run torch on one thread, as this module's inline runs do.
    inline, _ = run_secure(InlineGrid(secure_client_app(TASK), num_nodes=N))
    with ThreadedGrid(secure_client_app(TASK), num_nodes=N, num_workers=2) as grid:
        threaded, report = run_secure(grid)
    assert all(np.array_equal(inline[k], threaded[k]) for k in inline)
    assert report.train[wire.SURVIVORS_METRIC] == N


def test_aggregate_equals_plain_fedavg_within_the_quantization_bound() -> None:
    secure, report = run_secure(InlineGrid(secure_client_app(TASK), num_nodes=N))
    plain = run_rounds(
        strategy=FedAvg(**everyone()),
        grid=InlineGrid(make_client_app(TASK), num_nodes=N),
        initial_arrays=initial_arrays(),
        num_rounds=1,
        train_config=ConfigRecord({keys.SEED: 0}),
    )
    plain_arrays = arrays_of(plain)
    start = arrays_of(initial_arrays())
    assert_within_bound(secure, {k: v.astype(np.float64) for k, v in plain_arrays.items()}, BOUND)
    assert any(not np.array_equal(plain_arrays[k], start[k]) for k in start)  # it trained
    assert report.train[keys.NUM_EXAMPLES] == sum(WEIGHTS.values())
    assert report.train[wire.SURVIVORS_METRIC] == N
    assert report.exchanges == 4


@pytest.mark.parametrize(
    ("stage", "survivors"),
    [(wire.MASKED_INPUT, N - 2), (wire.UNMASK, N)],
    ids=["drop-before-masked-input", "drop-after-masked-input"],
)
def test_twenty_percent_dropouts_still_give_the_exact_sum(stage: str, survivors: int) -> None:
    trained: dict[int, dict[str, np.ndarray]] = {}
    dropped = {FIRST_NODE + 3, FIRST_NODE + 8}
    grid = ServerView(recording_app(trained), drop={stage: dropped})
    secure, report = run_secure(grid)

    # Dropping before the masked input leaves those updates out; dropping after it,
    # their inputs are in the sum and their self masks are rebuilt from shares.
    assert len(trained) == survivors
    assert report.train[wire.SURVIVORS_METRIC] == survivors
    assert report.train[wire.DROPPED_METRIC] == N - survivors
    assert max_update(trained) < CLIP  # nothing clipped: only quantization error remains
    assert_within_bound(secure, weighted_mean(trained, trained), BOUND)


@pytest.fixture
def seeded_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Derive clients' keys and self-mask seeds from a fixed seed, for reproducible statistics.

    Real runs draw them from the OS, as key material must be; the statistical
    checks below then test the same masks every run.
    """
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import private_key_to_bytes, public_key_to_bytes

    import fedsim.clients.secagg_mod as client_side
    from fedsim.privacy.secagg import crypto

    draws = np.random.default_rng(20261123)

    def key_pair() -> tuple[bytes, bytes]:
        secret = int.from_bytes(draws.bytes(40), "big") % (2**383) + 1
        private = ec.derive_private_key(secret, ec.SECP384R1())
        return private_key_to_bytes(private), public_key_to_bytes(private.public_key())

    monkeypatch.setattr(client_side, "new_key_pair", key_pair)
    monkeypatch.setattr(client_side, "new_seed", lambda: draws.bytes(crypto.SEED_BYTES))


@pytest.mark.usefixtures("seeded_secrets")
def test_server_only_ever_holds_masked_vectors() -> None:
    trained: dict[int, dict[str, np.ndarray]] = {}
    grid = ServerView(recording_app(trained), drop={wire.MASKED_INPUT: {FIRST_NODE + 1}})
    run_secure(grid)

    # No reply carries metrics or arrays, except the masked inputs: one uint32 vector each.
    masked = {}
    for kind, reply in grid.replies:
        if reply.has_error():
            continue
        assert not records_of(reply.content, MetricRecord)
        arrays = records_of(reply.content, ArrayRecord)
        if kind == wire.MASKED_INPUT:
            assert list(reply.content) == [wire.MASKED]
            masked[reply.metadata.src_node_id] = arrays_of(arrays[wire.MASKED])[wire.MASKED_VECTOR]
        else:
            assert not arrays
    assert sorted(masked) == sorted(trained)

    start, _ = flatten(arrays_of(initial_arrays()))
    quantizer = FieldQuantizer(
        clip_range=CLIP, levels=levels_for(N, MAX_WEIGHT), max_weight=MAX_WEIGHT
    )
    # Each client's true input, re-encoded with the generator the client used.
    true_inputs = {
        node: quantizer.encode(
            flatten(trained[node])[0] - start, WEIGHTS[node], numpy_rng(0, 1, node, "secagg")
        )
        for node in trained
    }
    for vector in masked.values():
        assert vector.dtype == np.uint32 and vector.shape == (start.size + 1,)
        assert_uniform_mod_2_32(vector)
        for true_input in true_inputs.values():  # no match with any client's input
            assert np.count_nonzero(vector == true_input) <= 1  # P(one match) ≈ d / 2^32
            signed = true_input.view(np.int32).astype(np.float64)
            correlation = np.corrcoef(vector.astype(np.float64), signed)[0, 1]
            assert abs(correlation) < 5 / np.sqrt(vector.size)
    for true_input in true_inputs.values():
        with pytest.raises(AssertionError):  # the uniformity test has power
            assert_uniform_mod_2_32(true_input)


def assert_uniform_mod_2_32(vector: np.ndarray) -> None:
    """Mean within 5 SE of 2^31, and a chi-square test on 16 bins with the same tail mass."""
    values = vector.astype(np.float64) / MODULUS
    standard_error = np.sqrt(1 / 12 / values.size)
    assert abs(values.mean() - 0.5) < 5 * standard_error
    counts = np.bincount((vector >> 28).astype(np.int64), minlength=16)
    assert stats.chisquare(counts).pvalue > 5.7e-7  # P(|Z| > 5)


def test_too_many_dropouts_keep_the_previous_model(caplog: pytest.LogCaptureFixture) -> None:
    dropped = {FIRST_NODE + i for i in range(4)}  # 6 of 10 left, t = ⌈2·10/3⌉ = 7
    grid = ServerView(secure_client_app(TASK), drop={wire.MASKED_INPUT: dropped})
    with caplog.at_level(logging.WARNING, logger="fedsim.strategies.secure_aggregation"):
        final, _ = run_secure(grid)
    start = arrays_of(initial_arrays())
    assert all(np.array_equal(final[k], start[k]) for k in start)
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("secure_aggregation")]
    assert lines == [
        f"Round 1: secure aggregation stopped at {wire.MASKED_INPUT}: "
        "6 clients answered, 7 needed; model kept"
    ]
    assert not any(kind == wire.UNMASK for kind, _ in grid.replies)


def test_clients_refuse_to_reveal_both_secrets_of_one_client() -> None:
    class Curious(SecureSummation):
        """Claims a survivor dropped out, to get its self seed and its mask key."""

        def _send(self, nodes, message_type, records):
            if message_type == wire.UNMASK:
                lists = records[wire.RECORD]
                lists[wire.DROPPED] = [lists[wire.SURVIVORS][0]]
            return super()._send(nodes, message_type, records)

    curious = secure(SecureAggregation)
    curious.summation = Curious(clip_range=CLIP, max_weight=MAX_WEIGHT)
    grid = ServerView(secure_client_app(TASK))
    final, _ = run_secure(grid, strategy=curious)
    unmask_replies = [reply for kind, reply in grid.replies if kind == wire.UNMASK]
    assert len(unmask_replies) == N and all(reply.has_error() for reply in unmask_replies)
    start = arrays_of(initial_arrays())
    assert all(np.array_equal(final[k], start[k]) for k in start)


def test_same_seed_same_result_though_keys_are_fresh() -> None:
    def result(seed: int) -> dict[str, np.ndarray]:
        return run_secure(InlineGrid(secure_client_app(TASK), num_nodes=N), seed=seed)[0]

    first, again, other = result(0), result(0), result(1)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)


# ---------------------------------------------------------------- pure parts


def test_masks_cancel_and_dropped_masks_are_removed_exactly() -> None:
    rng = np.random.default_rng(0)
    nodes = [2, 3, 5, 7, 11]
    inputs = {u: rng.integers(0, MODULUS, 50, dtype=np.uint64).astype(np.uint32) for u in nodes}
    mask_keys = {u: new_key_pair() for u in nodes}
    seeds = {u: new_seed() for u in nodes}
    survivors, dropped = [2, 5, 7, 11], [3]  # 3 shared keys, then sent no input
    total = np.zeros(50, dtype=np.uint32)
    for u in survivors:
        peers = {v: mask_keys[v][1] for v in nodes if v != u}
        total += mask(
            inputs[u], node=u, self_seed=seeds[u], mask_key=mask_keys[u][0], peer_keys=peers
        )
    result = unmask(
        total,
        self_seeds=[seeds[u] for u in survivors],
        dropped_keys={v: mask_keys[v][0] for v in dropped},
        survivor_keys={u: mask_keys[u][1] for u in survivors},
    )
    expected = np.zeros(50, dtype=np.uint32)
    for u in survivors:
        expected += inputs[u]
    np.testing.assert_array_equal(result, expected)


def test_quantized_sum_of_extreme_inputs_does_not_wrap() -> None:
    quantizer = FieldQuantizer(clip_range=2.0, levels=levels_for(7, 30), max_weight=30)
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):
        total = np.zeros(4, dtype=np.uint32)
        for _ in range(7):
            total += quantizer.encode(np.full(3, sign * 5.0), 30, rng)  # clipped to ±c
        mean, weight = quantizer.decode(total)
        assert weight == 7 * 30
        np.testing.assert_allclose(mean, sign * 2.0, rtol=0, atol=1e-12)


def test_decoded_mean_is_within_c_over_l_and_rounding_is_unbiased() -> None:
    quantizer = FieldQuantizer(clip_range=1.0, levels=10, max_weight=5)  # coarse: step 0.1
    rng = np.random.default_rng(1)
    updates = [rng.uniform(-1, 1, 1000) for _ in range(3)]
    weights = [1, 3, 5]
    total = np.zeros(1001, dtype=np.uint32)
    for update, weight in zip(updates, weights, strict=True):
        total += quantizer.encode(update, weight, rng)
    mean, weight = quantizer.decode(total)
    exact = sum(w * u for w, u in zip(weights, updates, strict=True)) / sum(weights)
    assert weight == 9
    assert np.max(np.abs(mean - exact)) < quantizer.error_bound == pytest.approx(0.1)

    # Stochastic rounding: the mean of many encodings of x = 0.537 (5.37 levels) is x.
    draws = 200_000
    x = np.full(draws, 0.537)
    levels = quantizer.encode(x, 1, rng)[:-1].view(np.int32)
    assert set(np.unique(levels)) == {5, 6}
    p = 0.37
    assert abs(levels.mean() - 5.37) < 5 * np.sqrt(p * (1 - p) / draws)


def test_weights_above_max_weight_are_capped() -> None:
    quantizer = FieldQuantizer(clip_range=1.0, levels=10, max_weight=5)
    encoded = quantizer.encode(np.array([0.5]), 8, np.random.default_rng(0))
    assert list(encoded) == [25, 5]  # 5 levels x weight 5, then the weight


def test_shares_sealing_and_prg() -> None:
    secret = new_seed()
    shares = share(secret, 3, 5)
    assert (
        reconstruct(shares[1:4], 3) == reconstruct([shares[4], shares[0], shares[2]], 3) == secret
    )
    with pytest.raises(ValueError, match="2 shares of a secret, 3 needed"):
        reconstruct(shares[:2], 3)

    (sk_a, pk_a), (sk_b, pk_b) = new_key_pair(), new_key_pair()
    key = agree(sk_a, pk_b)
    assert key == agree(sk_b, pk_a) and len(key) == 32
    sealed = seal(key, 2, 3, b"b-share", b"s-share")
    assert open_sealed(agree(sk_b, pk_a), sealed, source=2, destination=3) == (
        b"b-share",
        b"s-share",
    )
    with pytest.raises(ValueError, match="sealed from 2 to 3"):
        open_sealed(key, sealed, source=4, destination=3)

    stream = prg(key, 100_000)
    np.testing.assert_array_equal(stream, prg(key, 100_000))
    assert not np.array_equal(stream, prg(secret, 100_000))
    assert_uniform_mod_2_32(stream)
