"""Device heterogeneity: profiles, availability, the round deadline and simulated time."""

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.supercore.run import Run

from fedsim.engine import InlineGrid
from fedsim.engine.devices import CsvProfiles, DeviceProfile, SampledProfiles, simulated_seconds
from fedsim.engine.execute import assign_message_id
from fedsim.engine.heterogeneity import HeterogeneousGrid, RoundTiming
from fedsim.engine.nodes import FIRST_NODE_ID

K = 5  # standard errors allowed in every statistical bound


class Constant:
    """Every node has the same profile."""

    def __init__(self, speed: float = 1.0, availability: float = 1.0, mbps: float = 1e6) -> None:
        self.device = DeviceProfile(speed, availability, mbps)

    def profile(self, node_id: int) -> DeviceProfile:
        return self.device


def _payload(num_bytes: int) -> ArrayRecord:
    """An ArrayRecord whose arrays hold exactly ``num_bytes`` bytes of data."""
    return ArrayRecord(
        {"w": Array(dtype="uint8", shape=(num_bytes,), stype="raw", data=bytes(num_bytes))}
    )


def _counting_app(calls: list[tuple[int, int]]) -> ClientApp:
    """Record (round, node) of each call; reply with 1 example and train_loss = partition id."""
    app = ClientApp()

    def reply(message: Message, context: Context, **metrics: float) -> Message:
        round_ = message.content["config"]["server-round"] if "config" in message.content else 0
        calls.append((int(round_), context.node_id))  # type: ignore[arg-type]
        content = RecordDict({"metrics": MetricRecord({"num-examples": 1, **metrics})})
        if "arrays" in message.content:
            content["arrays"] = message.content["arrays"]
        return Message(content, reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return reply(message, context, train_loss=float(context.node_config["partition-id"]))

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return reply(message, context, loss=0.0)

    return app


def _instructions(
    nodes: Iterable[int], round_: int | None = None, payload: int = 0
) -> list[Message]:
    content = RecordDict({"arrays": _payload(payload)})
    if round_ is not None:
        content["config"] = ConfigRecord({"server-round": round_})
    return [Message(content, node, "train") for node in nodes]


class StubGrid(Grid):
    """Replies to each message with ``reply_bytes`` of arrays and a chosen compute time."""

    def __init__(self, compute_s: dict[int, float], reply_bytes: int) -> None:
        self.compute_s, self.reply_bytes = compute_s, reply_bytes
        self.compute_seconds: dict[str, float] = {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        self.compute_seconds = {}
        for message in messages:
            assign_message_id(message)  # a fresh id, as real grids assign on sending
            self.compute_seconds[message.metadata.message_id] = self.compute_s[
                message.metadata.dst_node_id
            ]
            yield Message(RecordDict({"arrays": _payload(self.reply_bytes)}), reply_to=message)

    def set_run(self, run: Run) -> None: ...

    @property
    def run(self) -> Run:
        return Run.create_empty(1)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_node_ids(self) -> Sequence[int]:
        return list(self.compute_s)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError


# --- pure maths and validation -------------------------------------------------------


def test_simulated_seconds_adds_scaled_compute_and_transfer_time() -> None:
    device = DeviceProfile(speed=0.5, availability=1.0, bandwidth_mbps=8.0)  # 1e6 bytes/s
    # 3 s of compute at half speed = 6 s; 1.5 MB down + 0.5 MB up at 1 MB/s = 2 s.
    assert simulated_seconds(device, compute_s=3.0, bytes_down=1_500_000, bytes_up=500_000) == 8.0
    fast = DeviceProfile(speed=4.0, availability=0.1, bandwidth_mbps=100.0)
    assert simulated_seconds(fast, compute_s=2.0, bytes_down=0, bytes_up=0) == 0.5
    assert simulated_seconds(fast, compute_s=0.0, bytes_down=12_500_000, bytes_up=0) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"speed": 0.0}, "speed"),
        ({"speed": -1.0}, "speed"),
        ({"speed": math.inf}, "speed"),
        ({"availability": 0.0}, "availability"),
        ({"availability": 1.01}, "availability"),
        ({"availability": math.nan}, "availability"),
        ({"bandwidth_mbps": 0.0}, "bandwidth_mbps"),
        ({"bandwidth_mbps": math.nan}, "bandwidth_mbps"),
    ],
)
def test_device_profile_rejects_out_of_range_fields(kwargs: dict, field: str) -> None:
    values = {"speed": 1.0, "availability": 1.0, "bandwidth_mbps": 1.0} | kwargs
    with pytest.raises(ValueError, match=f"^{field} must be"):
        DeviceProfile(**values)


# --- sampled profiles ----------------------------------------------------------------


def test_sampled_profiles_depend_on_seed_and_node_only() -> None:
    nodes = [FIRST_NODE_ID + i for i in range(50)]
    forward = [SampledProfiles(seed=7).profile(n) for n in nodes]
    backward = SampledProfiles(seed=7)
    backwards = [backward.profile(n) for n in reversed(nodes)][::-1]
    other_seed = [SampledProfiles(seed=8).profile(n) for n in nodes]
    assert forward == backwards
    assert forward != other_seed
    assert len(set(forward)) == len(nodes)  # nodes differ from one another


def test_sampled_profiles_follow_their_distributions() -> None:
    n, sigma, mean, conc, median, bw_sigma = 100_000, 0.5, 0.8, 10.0, 20.0, 1.0
    source = SampledProfiles(
        seed=0,
        speed_sigma=sigma,
        availability_mean=mean,
        availability_concentration=conc,
        bandwidth_median_mbps=median,
        bandwidth_sigma=bw_sigma,
    )
    profiles = [source.profile(FIRST_NODE_ID + i) for i in range(n)]
    log_speed = np.log([p.speed for p in profiles])
    availability = np.array([p.availability for p in profiles])
    log_bandwidth = np.log([p.bandwidth_mbps for p in profiles])
    # log(speed) ~ N(0, sigma^2): SE(mean) = sigma/sqrt(n), SE(var) ~ sigma^2 sqrt(2/(n-1)).
    assert abs(log_speed.mean()) < K * sigma / math.sqrt(n)
    assert abs(log_speed.var(ddof=1) - sigma**2) < K * sigma**2 * math.sqrt(2 / (n - 1))
    # Beta(m c, (1-m) c) has variance m (1 - m) / (c + 1).
    assert abs(availability.mean() - mean) < K * math.sqrt(mean * (1 - mean) / (conc + 1) / n)
    assert availability.min() >= 1e-3 and availability.max() <= 1.0
    assert abs(log_bandwidth.mean() - math.log(median)) < K * bw_sigma / math.sqrt(n)


# --- CSV profiles --------------------------------------------------------------------

HEADER = "partition_id,speed,availability,bandwidth_mbps\n"


def test_csv_profiles_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    path.write_text(HEADER + "0,1.0,0.9,20\n1, 0.25 ,1,5.5\n")
    source = CsvProfiles(path)
    assert source.profile(FIRST_NODE_ID) == DeviceProfile(1.0, 0.9, 20.0)
    assert source.profile(FIRST_NODE_ID + 1) == DeviceProfile(0.25, 1.0, 5.5)
    with pytest.raises(KeyError, match="partition_id 2 "):
        source.profile(FIRST_NODE_ID + 2)


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("0,1.0,0.9,20\n1,fast,0.9,20\n", "line 3, column 'speed': 'fast' is not a number"),
        ("0,1.0,1.5,20\n", "line 2, column 'availability': availability must be in"),
        ("0,1.0,0.9,\n", "line 2, column 'bandwidth_mbps': '' is not a number"),
        ("x,1.0,0.9,20\n", "line 2, column 'partition_id': 'x' is not an integer"),
        ("0,1,1,1\n1,1,1,1\n0,1,1,1\n", "line 4, column 'partition_id': 0 repeats line 2"),
    ],
)
def test_csv_profiles_name_the_line_and_column_of_a_bad_value(
    tmp_path: Path, body: str, where: str
) -> None:
    path = tmp_path / "devices.csv"
    path.write_text(HEADER + body)
    with pytest.raises(ValueError, match="devices.csv, " + where.replace("(", r"\(")) as error:
        CsvProfiles(path)
    assert "\n" not in str(error.value)


def test_csv_profiles_reject_a_missing_column_or_file(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    path.write_text("partition_id,speed,availability\n0,1,1\n")
    with pytest.raises(ValueError, match="line 1, column 'bandwidth_mbps': missing"):
        CsvProfiles(path)
    with pytest.raises(ValueError, match="nowhere.csv: cannot read"):
        CsvProfiles(tmp_path / "nowhere.csv")


# --- availability --------------------------------------------------------------------


def test_offline_devices_never_run_and_their_fraction_matches_availability() -> None:
    rounds, num_nodes, p = 200, 50, 0.5
    calls: list[tuple[int, int]] = []
    inner = InlineGrid(_counting_app(calls), num_nodes=num_nodes)
    grid = HeterogeneousGrid(inner, Constant(availability=p), seed=3)
    offline: set[tuple[int, int]] = set()
    for round_ in range(1, rounds + 1):
        for reply in grid.send_and_receive(_instructions(inner.get_node_ids(), round_)):
            if reply.has_error():
                assert reply.error.code == ErrorCode.NODE_UNAVAILABLE
                offline.add((round_, reply.metadata.src_node_id))
    n = rounds * num_nodes
    assert abs(len(offline) / n - p) < K * math.sqrt(p * (1 - p) / n)
    assert offline.isdisjoint(calls) and len(offline) + len(calls) == n
    assert sum(t.unavailable for t in grid.timings) == len(offline)
    assert all(t.completed == t.sent - t.unavailable for t in grid.timings)


def test_same_seed_same_devices_offline_whatever_the_order_sent() -> None:
    def offline(seed: int, nodes: list[int]) -> set[tuple[int, int]]:
        inner = InlineGrid(_counting_app([]), num_nodes=40)
        grid = HeterogeneousGrid(inner, Constant(availability=0.5), seed=seed)
        return {
            (r, reply.metadata.src_node_id)
            for r in (1, 2, 3)
            for reply in grid.send_and_receive(_instructions(nodes, r))
            if reply.has_error()
        }

    nodes = [FIRST_NODE_ID + i for i in range(40)]
    assert offline(1, nodes) == offline(1, nodes[::-1])
    assert offline(1, nodes) != offline(2, nodes)


def test_without_a_server_round_each_exchange_is_a_new_round() -> None:
    inner = InlineGrid(_counting_app([]), num_nodes=40)
    grid = HeterogeneousGrid(inner, Constant(availability=0.5), seed=0)
    patterns = [
        [r.has_error() for r in grid.send_and_receive(_instructions(inner.get_node_ids()))]
        for _ in range(2)
    ]
    assert patterns[0] != patterns[1]  # (1 - 2^-40 chance of failing by luck; seed fixed)


def test_replies_point_at_their_instructions() -> None:
    # Round 1 with seed 0: a mix of offline devices, late and punctual clients.
    inner = StubGrid({FIRST_NODE_ID + i: float(i) for i in range(20)}, reply_bytes=0)
    grid = HeterogeneousGrid(inner, Constant(availability=0.5), seed=0, deadline_s=9.5)
    messages = _instructions(inner.get_node_ids(), 1)
    replies = list(grid.send_and_receive(messages))
    by_node = {m.metadata.dst_node_id: m.metadata.message_id for m in messages}
    assert len(set(by_node.values())) == len(messages)
    assert {r.metadata.src_node_id: r.metadata.reply_to_message_id for r in replies} == by_node
    timing = grid.last_timing
    assert timing is not None and timing.unavailable and timing.late and timing.completed


# --- deadline and simulated time -----------------------------------------------------


def _stub_round(deadline_s: float | None) -> tuple[list[Message], RoundTiming]:
    # Speed 0.5, 0.008 Mbps = 1000 bytes/s; 1000 bytes down + 1000 up = 2 s of transfer.
    # Node i computes 0.5 i s, i.e. i s at half speed: simulated time is i + 2 s.
    inner = StubGrid({FIRST_NODE_ID + i: 0.5 * i for i in range(5)}, reply_bytes=1000)
    grid = HeterogeneousGrid(inner, Constant(speed=0.5, mbps=0.008), seed=0, deadline_s=deadline_s)
    replies = list(grid.send_and_receive(_instructions(inner.get_node_ids(), 1, payload=1000)))
    assert grid.last_timing is not None and grid.timings == [grid.last_timing]
    return replies, grid.last_timing


def test_clients_past_the_deadline_are_dropped_and_counted() -> None:
    replies, timing = _stub_round(deadline_s=4.5)  # nodes 0..2 take 2, 3, 4 s; 3, 4 take 5, 6 s
    late = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id - FIRST_NODE_ID for r in late] == [3, 4]
    assert all(r.error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE for r in late)
    assert late[0].error.reason == "missed the 4.5 s deadline (simulated 5 s)"
    assert (timing.sent, timing.unavailable, timing.late, timing.completed) == (5, 0, 2, 3)
    assert timing.simulated_s == 4.5  # the server waited out the deadline


def test_simulated_time_is_the_slowest_client_when_none_is_late() -> None:
    for deadline in (None, 6.0):
        replies, timing = _stub_round(deadline_s=deadline)
        assert not any(r.has_error() for r in replies)
        assert (timing.late, timing.completed, timing.simulated_s) == (0, 5, 6.0)
        assert 0.0 <= timing.real_s < 1.0


def _counts(timing: RoundTiming | None) -> tuple[float, int, int, int, int]:
    """(simulated_s, sent, unavailable, late, completed): everything but the real time."""
    assert timing is not None
    return (timing.simulated_s, timing.sent, timing.unavailable, timing.late, timing.completed)


def test_no_client_run_means_no_simulated_time() -> None:
    inner = InlineGrid(_counting_app([]), num_nodes=3)
    grid = HeterogeneousGrid(inner, Constant(availability=1e-9), seed=0, deadline_s=1.0)
    replies = list(grid.send_and_receive(_instructions(inner.get_node_ids(), 1)))
    assert all(r.error.code == ErrorCode.NODE_UNAVAILABLE for r in replies)
    assert _counts(grid.last_timing) == (0.0, 3, 3, 0, 0)


def test_measured_compute_is_scaled_by_device_speed() -> None:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        time.sleep(0.05)  # at least 0.05 s of "compute" on this machine
        return Message(RecordDict({"m": MetricRecord({"num-examples": 1})}), reply_to=message)

    def run(speed: float) -> RoundTiming:
        grid = HeterogeneousGrid(
            InlineGrid(app, num_nodes=2), Constant(speed=speed), seed=0, deadline_s=0.3
        )
        list(grid.send_and_receive(_instructions([FIRST_NODE_ID, FIRST_NODE_ID + 1], 1)))
        assert grid.last_timing is not None
        return grid.last_timing

    slow, fast = run(speed=0.1), run(speed=100.0)
    assert (slow.late, slow.completed, slow.simulated_s) == (2, 0, 0.3)  # >= 0.5 s each
    assert (fast.late, fast.completed) == (0, 2) and 0.05 / 100 <= fast.simulated_s < 0.3


def test_inner_error_replies_pass_through_uncounted() -> None:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        raise RuntimeError("disk full")

    grid = HeterogeneousGrid(InlineGrid(app, num_nodes=3), Constant(), seed=0, deadline_s=1.0)
    replies = list(grid.send_and_receive(_instructions(range(FIRST_NODE_ID, FIRST_NODE_ID + 3), 1)))
    assert all("disk full" in str(r.error.reason) for r in replies)
    assert _counts(grid.last_timing) == (0.0, 3, 0, 0, 0)


def test_replies_stream_and_timing_is_set_when_exhausted() -> None:
    calls: list[tuple[int, int]] = []
    grid = HeterogeneousGrid(InlineGrid(_counting_app(calls), num_nodes=5), Constant(), seed=0)
    replies = grid.stream_replies(_instructions(range(FIRST_NODE_ID, FIRST_NODE_ID + 5), 1))
    next(replies)
    assert len(calls) == 1 and grid.last_timing is None
    list(replies)
    assert len(calls) == 5 and grid.last_timing is not None and grid.last_timing.completed == 5


def test_state_dict_round_trips() -> None:
    inner = InlineGrid(_counting_app([]), num_nodes=4)
    grid = HeterogeneousGrid(inner, Constant(availability=0.5), seed=0)
    for _ in range(3):
        list(grid.send_and_receive(_instructions(inner.get_node_ids())))
    resumed = HeterogeneousGrid(inner, Constant(availability=0.5), seed=0)
    resumed.load_state_dict(grid.state_dict())
    assert resumed.timings == grid.timings and resumed.last_timing == grid.last_timing
    # The next exchange without a server round is round 4 for both.
    nxt = [
        [r.has_error() for r in g.send_and_receive(_instructions(inner.get_node_ids()))]
        for g in (grid, resumed)
    ]
    assert nxt[0] == nxt[1]


# --- with Flower's own strategy ------------------------------------------------------


def test_flowers_fedavg_runs_on_the_grid_and_skips_dropped_clients() -> None:
    calls: list[tuple[int, int]] = []
    inner = InlineGrid(_counting_app(calls), num_nodes=10)
    grid = HeterogeneousGrid(inner, Constant(availability=0.5), seed=0)
    result = FlowerFedAvg(fraction_train=1.0, fraction_evaluate=1.0).start(
        grid=grid, initial_arrays=ArrayRecord([np.zeros(3, dtype=np.float32)]), num_rounds=3
    )
    assert len(grid.timings) == 6  # train and evaluate, three rounds
    for round_ in (1, 2, 3):
        ran = [node - FIRST_NODE_ID for r, node in calls if r == round_]
        train, evaluate = grid.timings[2 * round_ - 2], grid.timings[2 * round_ - 1]
        # Train and evaluate of one round see the same devices: each node ran twice.
        assert len(ran) == 2 * train.completed and train.unavailable == evaluate.unavailable
        # The aggregate averages only the partitions that ran (train_loss = partition id).
        expected = np.mean(sorted(set(ran)))
        assert result.train_metrics_clientapp[round_]["train_loss"] == pytest.approx(expected)
    assert 0 < sum(t.unavailable for t in grid.timings) < 60
