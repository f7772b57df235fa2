"""The Ray engine: pool sizing, streaming, state across actors, failures.

Its models equal the inline engine's bit for bit in tests/test_faults.py (four strategies,
in process), tests/test_sigkill_ray.py (`fedsim run`, resumed) and
tests/test_flower_strategies.py (every Flower strategy).
"""

import os
import time
from collections.abc import Iterator

import numpy as np
import pytest
import ray
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedsim.engine.ray_exchange import BATCH_BYTES, batch_size
from fedsim.engine.ray_grid import RayGrid, RayResources, pool_size, release_kept_actors
from fedsim.engine.simulated import threads_for


def test_pool_size_fits_cpus_and_gpus() -> None:
    assert pool_size(RayResources(num_cpus=1), {"CPU": 2}) == 2
    assert pool_size(RayResources(num_cpus=0.5), {"CPU": 2}) == 4
    assert pool_size(RayResources(num_cpus=1, num_gpus=0.25), {"CPU": 16, "GPU": 1}) == 4
    assert pool_size(RayResources(num_cpus=1, num_actors=1), {"CPU": 8}) == 1


@pytest.mark.parametrize(
    ("resources", "cluster"),
    [
        (RayResources(num_cpus=4), {"CPU": 2}),
        (RayResources(num_cpus=1, num_gpus=1), {"CPU": 2}),
        (RayResources(num_cpus=1, num_actors=3), {"CPU": 2}),
    ],
)
def test_pool_size_refuses_what_does_not_fit(resources, cluster) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        pool_size(resources, cluster)


def test_threads_follow_the_cpu_share_and_resources_are_validated() -> None:
    assert [threads_for(c) for c in (0.25, 1, 1.5, 4)] == [1, 1, 1, 4]
    with pytest.raises(ValueError, match="num_cpus"):
        RayResources(num_cpus=0)
    with pytest.raises(ValueError, match="num_actors"):
        RayResources(num_actors=0)


def test_batches_shrink_as_the_queue_empties_and_respect_the_memory_cap() -> None:
    sizes, queued = [], 100
    while queued:
        sizes.append(batch_size(queued, num_actors=2, payload_bytes=424_000))
        queued -= sizes[-1]
    assert sizes[0] == 25 and sizes[-3:] == [1, 1, 1] and sizes == sorted(sizes, reverse=True)
    assert len(sizes) < 25  # a few tasks per actor, not one per message
    assert batch_size(1000, num_actors=2, payload_bytes=BATCH_BYTES // 4) == 4
    assert batch_size(1000, num_actors=2, payload_bytes=2 * BATCH_BYTES) == 1


def _app() -> ClientApp:
    """Adds its partition id to the arrays, counts its calls in Context.state.

    Partition 3 always raises; partition 5 kills its worker process; a config
    entry ``sleep`` makes every client sleep that long. ``app-calls`` counts the
    calls this copy of the app has run (state a ClientApp keeps in its process).
    """
    app = ClientApp()
    app_calls: list[int] = []

    @app.train()
    def train(message: Message, context: Context) -> Message:
        partition = context.node_config["partition-id"]
        if partition == 3:
            raise RuntimeError("bad node")
        if partition == 5 and message.content["config"].get("crash"):
            os._exit(1)
        time.sleep(float(message.content["config"].get("sleep", 0.0)))
        calls = context.state.setdefault("calls", MetricRecord({"n": 0}))
        calls["n"] = calls["n"] + 1
        app_calls.append(1)
        arrays = ArrayRecord([a.numpy() + partition for a in message.content["arrays"].values()])
        shared = next(iter(message.content["arrays"].values()))
        metrics = MetricRecord(
            {
                "num-examples": 1,
                "calls": calls["n"],
                "app-calls": len(app_calls),
                "pid": os.getpid(),
                "shared": id(shared),
            }
        )
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)

    return app


@pytest.fixture(scope="module")
def grid() -> Iterator[RayGrid]:
    with RayGrid(_app(), num_nodes=8, resources=RayResources(num_actors=2)) as ray_grid:
        yield ray_grid


def _messages(grid: RayGrid, nodes: list[int], **config: float) -> list[Message]:
    content = RecordDict(
        {"arrays": ArrayRecord([np.zeros(2, np.float32)]), "config": ConfigRecord(config)}
    )
    return [Message(content, grid.get_node_ids()[p], "train") for p in nodes]


def _outcome(reply: Message) -> object:
    return (
        reply.error.reason.split(" (at")[0]
        if reply.has_error()
        else reply.content["metrics"]["calls"]
    )


def _app_calls_by_actor(replies: list[Message]) -> dict[int, int]:
    """Return, per actor process, the calls its copy of the app had run by the last reply."""
    calls: dict[int, int] = {}
    for reply in replies:
        metrics = reply.content["metrics"]
        calls[metrics["pid"]] = max(calls.get(metrics["pid"], 0), metrics["app-calls"])
    return calls


@pytest.mark.slow
def test_a_kept_pool_starts_the_next_grid_at_once_as_if_new() -> None:
    # Defined before the tests that use the module's grid, so that it runs while no Ray
    # is up: the kept pool would not fit beside that grid's actors.
    assert not ray.is_initialized(), "this test starts and stops its own Ray"
    nodes, resources = [0, 1, 2, 4, 6, 7], RayResources(num_actors=2)
    with RayGrid(_app(), num_nodes=8, resources=resources, keep_actors=True) as first:
        before = first.send_and_receive(_messages(first, nodes))
    assert ray.is_initialized()  # kept for the pool, with the actors

    # An app built again pickles to the same bytes: the next grid takes the pool.
    with RayGrid(_app(), num_nodes=8, resources=resources, keep_actors=True) as second:
        assert second.ray_init_s == 0.0 and second.pool_startup_s < 1.0
        after = second.send_and_receive(_messages(second, nodes))
    assert _app_calls_by_actor(after).keys() == _app_calls_by_actor(before).keys()  # same actors
    # As new: node state lives on the driver, and each actor's app is a new copy.
    assert [_outcome(r) for r in after] == [_outcome(r) for r in before] == [1] * len(nodes)
    assert sum(_app_calls_by_actor(after).values()) == len(nodes)
    arrays = [r.content["arrays"].to_numpy_ndarrays()[0].tolist() for r in after]
    assert arrays == [[p, p] for p in nodes]  # zeros plus the partition id

    # Other settings do not fit the kept actors: they go, new ones start, and this grid,
    # which takes over the Ray the first grid started, leaves it to release_kept_actors.
    with RayGrid(
        _app(), num_nodes=8, resources=resources, check_finite_arrays=False, keep_actors=True
    ) as other:
        replies = other.send_and_receive(_messages(other, nodes))
    assert not _app_calls_by_actor(replies).keys() & _app_calls_by_actor(after).keys()
    release_kept_actors()
    assert not ray.is_initialized()


@pytest.mark.slow
def test_state_survives_across_rounds_and_actors_and_failures_are_replies(grid: RayGrid) -> None:
    nodes = [0, 1, 2, 3, 4]
    by_round = []
    for _ in range(3):
        replies = grid.send_and_receive(_messages(grid, nodes))
        by_round.append(
            {grid.nodes.partition_id(r.metadata.src_node_id): _outcome(r) for r in replies}
        )
    for round_, outcome in enumerate(by_round, start=1):
        assert outcome == {0: round_, 1: round_, 2: round_, 3: "RuntimeError: bad node", 4: round_}
    assert grid.num_actors == 2


def _calls(grid: RayGrid, partition: int) -> int:
    """Return the calls the node of ``partition`` has counted in its Context.state."""
    state = grid.nodes.context(grid.get_node_ids()[partition]).state
    return int(state["calls"]["n"]) if "calls" in state else 0


@pytest.mark.slow
def test_pushed_messages_run_when_pulled_and_only_once(grid: RayGrid) -> None:
    nodes = [0, 1, 2, 4]
    before = [_calls(grid, p) for p in nodes]
    ids = list(grid.push_messages(_messages(grid, nodes)))
    assert [_calls(grid, p) for p in nodes] == before  # pushing runs nothing
    replies = list(grid.pull_messages([*ids, "unknown"]))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(ids)
    assert [_calls(grid, p) for p in nodes] == [n + 1 for n in before]
    for reply in replies:
        partition = grid.nodes.partition_id(reply.metadata.src_node_id)
        assert reply.content["arrays"].to_numpy_ndarrays()[0].tolist() == [partition] * 2
    assert list(grid.pull_messages(ids)) == []


@pytest.mark.slow
def test_shared_content_goes_to_the_object_store_once(
    grid: RayGrid, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value: puts.append(1) or real_put(value))
    replies = list(grid.send_and_receive(_messages(grid, [0, 1, 2, 4, 6, 7])))
    assert len(replies) == 6 and len(puts) == 1


@pytest.mark.slow
def test_an_actor_deserializes_the_shared_content_once_per_exchange(grid: RayGrid) -> None:
    # Clients on one actor receive the very same Array objects (each in its own copy
    # of the records), which is what lets a client reuse the model it decoded.
    seen: dict[int, set[int]] = {}
    for exchange in range(2):
        for r in grid.send_and_receive(_messages(grid, [0, 1, 2, 4, 6, 7])):
            metrics = r.content["metrics"]
            seen.setdefault((exchange, metrics["pid"]), set()).add(metrics["shared"])
    assert all(len(ids) == 1 for ids in seen.values())
    assert len({pid for _, pid in seen}) == 2  # both actors took part


@pytest.mark.slow
def test_flowers_own_fedavg_runs_on_the_ray_grid(grid: RayGrid) -> None:
    result = FlowerFedAvg(fraction_train=1.0, fraction_evaluate=0.0).start(
        grid=grid, initial_arrays=ArrayRecord([np.zeros(2, np.float32)]), num_rounds=1
    )
    # 8 nodes, node 3 fails: mean of partition ids {0,1,2,4,5,6,7} = 25/7.
    np.testing.assert_allclose(result.arrays.to_numpy_ndarrays()[0], [25 / 7] * 2, rtol=1e-6)


@pytest.mark.slow
def test_a_timeout_and_a_dead_worker_leave_a_working_pool(grid: RayGrid) -> None:
    replies = list(grid.send_and_receive(_messages(grid, [0, 1, 2, 4], sleep=3.0), timeout=0.5))
    assert [_outcome(r) for r in replies] == ["round timeout expired"] * 4
    crashed = list(grid.send_and_receive(_messages(grid, [5], crash=1.0)))
    assert crashed[0].has_error() and "actor died" in crashed[0].error.reason
    after = list(grid.send_and_receive(_messages(grid, [6, 7])))
    assert all(not r.has_error() for r in after) and grid.num_actors == 2


@pytest.mark.slow
def test_a_crash_inside_a_batch_costs_only_the_crashing_client(grid: RayGrid) -> None:
    # 8 messages on 2 actors go out in batches of 2, 2, 1, ...: node 5 shares its batch,
    # whose other message runs again alone on the replacement actor and succeeds.
    nodes = [0, 5, 1, 2, 4, 6, 7, 0]
    replies = list(grid.send_and_receive(_messages(grid, nodes[:-1], crash=1.0)))
    outcome = {grid.nodes.partition_id(r.metadata.src_node_id): r for r in replies}
    assert sorted(outcome) == sorted(nodes[:-1])
    assert outcome[5].has_error() and "actor died" in outcome[5].error.reason
    failed = {p: r.error.reason for p, r in outcome.items() if p != 5 and r.has_error()}
    assert not failed
    assert grid.num_actors == 2


@pytest.mark.slow
def test_a_task_queued_behind_a_crash_runs_again(grid: RayGrid) -> None:
    # 4 messages on 2 actors go out one per task, two tasks per actor: node 5 first on one
    # actor, node 2 queued behind it. Both are unfinished when the actor dies, so both run
    # again alone, and only node 5 kills its actor there.
    replies = list(grid.send_and_receive(_messages(grid, [5, 1, 2, 4], crash=1.0)))
    outcome = {grid.nodes.partition_id(r.metadata.src_node_id): r for r in replies}
    assert sorted(outcome) == [1, 2, 4, 5]
    assert outcome[5].has_error() and "actor died" in outcome[5].error.reason
    failed = {p: outcome[p].error.reason for p in (1, 2, 4) if outcome[p].has_error()}
    assert not failed
    assert grid.num_actors == 2
