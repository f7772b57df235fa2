"""The in-process engines (inline, threads): Flower Grids any Flower strategy runs on unchanged."""

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedsim.engine import InlineGrid
from fedsim.engine.nodes import FIRST_NODE_ID
from fedsim.engine.simulated import SimulatedGrid
from fedsim.engine.threaded import ThreadedGrid

GridFactory = Callable[[ClientApp, int], SimulatedGrid]


@pytest.fixture(params=["inline", "threads"])
def make_grid(request: pytest.FixtureRequest) -> Iterator[GridFactory]:
    """Build grids of one in-process engine; the threads engine runs 2 workers."""
    threaded: list[ThreadedGrid] = []

    def make(app: ClientApp, num_nodes: int) -> SimulatedGrid:
        if request.param == "inline":
            return InlineGrid(app, num_nodes=num_nodes)
        threaded.append(ThreadedGrid(app, num_nodes=num_nodes, num_workers=2))
        return threaded[-1]

    yield make
    for grid in threaded:
        grid.shutdown()


def _adder_app() -> ClientApp:
    """Each node adds its partition id to every array and reports 1 example."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        partition = context.node_config["partition-id"]
        arrays = message.content["arrays"]
        updated = {k: v.numpy() + partition for k, v in arrays.items()}
        metrics = MetricRecord({"num-examples": 1, "train_loss": float(partition)})
        record = ArrayRecord({k: a for k, a in ArrayRecord(list(updated.values())).items()})
        record = ArrayRecord(dict(zip(arrays.keys(), record.values(), strict=True)))
        return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 1, "loss": 0.0})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app


def test_flowers_own_fedavg_runs_unchanged_on_the_in_process_grids(
    make_grid: GridFactory,
) -> None:
    grid = make_grid(_adder_app(), 4)
    initial = ArrayRecord([np.zeros(3, dtype=np.float32)])
    result = FlowerFedAvg(fraction_train=1.0, fraction_evaluate=1.0).start(
        grid=grid, initial_arrays=initial, num_rounds=2
    )
    # Every round all 4 nodes (partitions 0..3) add their id: mean increment 1.5 per round.
    np.testing.assert_array_equal(result.arrays.to_numpy_ndarrays()[0], [3.0, 3.0, 3.0])
    assert result.train_metrics_clientapp[2]["train_loss"] == 1.5


def _message(node_id: int, content: RecordDict | None = None, kind: str = "train") -> Message:
    return Message(content or RecordDict(), node_id, kind)


def test_client_failures_become_error_replies_and_the_run_continues(
    make_grid: GridFactory,
) -> None:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        node = context.node_config["partition-id"]
        if node == 0:
            raise RuntimeError("disk full")
        if node == 1:
            bad = MetricRecord({"num-examples": 1, "loss": float("nan")})
            return Message(RecordDict({"m": bad}), reply_to=message)
        if node == 2:
            return "not a message"  # type: ignore[return-value]
        return Message(RecordDict({"m": MetricRecord({"num-examples": 1})}), reply_to=message)

    grid = make_grid(app, 4)
    replies = list(grid.send_and_receive([_message(FIRST_NODE_ID + i) for i in range(4)]))
    replies.sort(key=lambda r: r.metadata.src_node_id)  # the threads engine: completion order
    reasons = [r.error.reason if r.has_error() else None for r in replies]
    assert "RuntimeError: disk full" in reasons[0]
    assert "non-finite metric 'loss'" in reasons[1]
    assert "returned str" in reasons[2]
    assert reasons[3] is None
    assert [r.metadata.src_node_id for r in replies] == [FIRST_NODE_ID + i for i in range(4)]


def test_a_client_that_mutates_its_message_does_not_affect_other_clients() -> None:
    app, seen = ClientApp(), []

    @app.train()
    def train(message: Message, context: Context) -> Message:
        config = message.content["config"]
        seen.append(config["lr"])
        config["lr"] = -1.0  # a careless client
        message.content.pop("arrays")
        return Message(RecordDict({"m": MetricRecord({"num-examples": 1})}), reply_to=message)

    shared = RecordDict({"config": ConfigRecord({"lr": 0.1}), "arrays": ArrayRecord()})
    grid = InlineGrid(app, num_nodes=3)
    list(grid.send_and_receive([_message(n, shared) for n in grid.get_node_ids()]))
    assert seen == [0.1, 0.1, 0.1]
    assert shared["config"]["lr"] == 0.1 and "arrays" in shared


def test_node_context_persists_across_rounds(make_grid: GridFactory) -> None:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        state = context.state.setdefault("counter", MetricRecord({"n": 0}))
        state["n"] = state["n"] + 1
        return Message(
            RecordDict({"m": MetricRecord({"num-examples": state["n"]})}), reply_to=message
        )

    grid = make_grid(app, 10)
    node = FIRST_NODE_ID + 5
    counts = [
        next(iter(grid.send_and_receive([_message(node)]))).content["m"]["num-examples"]
        for _ in range(3)
    ]
    assert counts == [1, 2, 3]
    assert grid.nodes.num_with_state == 1


def test_pushed_messages_run_when_pulled_and_only_once(make_grid: GridFactory) -> None:
    grid = make_grid(_adder_app(), 3)
    content = RecordDict({"arrays": ArrayRecord([np.zeros(2, dtype=np.float32)])})
    ids = list(grid.push_messages([_message(n, content) for n in grid.get_node_ids()]))
    replies = list(grid.pull_messages([*ids, "unknown"]))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(ids)
    assert not any(r.has_error() for r in replies)
    assert list(grid.pull_messages(ids)) == []


def test_timeout_turns_unstarted_messages_into_error_replies(make_grid: GridFactory) -> None:
    grid = make_grid(_adder_app(), 3)
    replies = list(grid.send_and_receive([_message(n) for n in grid.get_node_ids()], timeout=-1))
    assert all(r.has_error() and "timeout" in r.error.reason for r in replies)


_RSS_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from fedsim.engine import InlineGrid
    from fedsim.strategies import FedAvg

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        content = RecordDict({"arrays": message.content["arrays"],
                              "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=message)

    population = int(sys.argv[1])
    grid = InlineGrid(app, num_nodes=population)
    strategy = FedAvg(seed=0, fraction_train=100 / population, min_train_nodes=100,
                      fraction_evaluate=0.0)
    strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(10, np.float32)]),
                   num_rounds=3)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rss_mb": rss_mb, "states": grid.nodes.num_with_state}))
    """
)


def _peak_rss_mb(population: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(population)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_million_nodes_cost_no_more_than_a_thousand_until_sampled() -> None:
    small, large = _peak_rss_mb(1_000), _peak_rss_mb(1_000_000)
    assert large["states"] == 0  # a stateless client keeps nothing between rounds
    assert large["rss_mb"] - small["rss_mb"] < 50, (small, large)
