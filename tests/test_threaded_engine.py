"""The threads engine: worker copies, node order, streaming, timeouts, its RNG caveat.

What it shares with the inline engine (Flower's FedAvg, failures as replies,
node state, timeouts) is tested on both in ``test_inline_engine.py``.
"""

import threading
import time
import warnings
from collections.abc import Iterator

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import TensorDataset

from fedsim.clients import TorchTask, make_client_app
from fedsim.engine import InlineGrid
from fedsim.engine.threaded import ThreadedGrid
from fedsim.strategies import FedAvg

# Module-level state every worker's copy of a ClientApp shares: cloudpickle copies a
# handler's closure, but refers to this module's top-level functions by name.
_events: list[tuple[str, int]] = []
_active: set[int] = set()
_lock = threading.Lock()


def _enter(node: int) -> None:
    with _lock:
        if node in _active:
            raise RuntimeError(f"node {node} runs twice at once")
        _active.add(node)
        _events.append(("start", node))


def _leave(node: int) -> None:
    with _lock:
        _active.discard(node)


@pytest.fixture(autouse=True)
def _fresh_events() -> None:
    _events.clear()
    _active.clear()


def _sleepy_app(seconds: float) -> ClientApp:
    """Each message sleeps, counts the node's calls and names the copy and thread it ran on."""
    app, copy_token = ClientApp(), object()  # the token is copied into each worker's ClientApp

    @app.train()
    def train(message: Message, context: Context) -> Message:
        node = message.metadata.dst_node_id
        _enter(node)
        try:
            time.sleep(seconds)
            calls = context.state.setdefault("calls", MetricRecord({"n": 0}))
            calls["n"] = calls["n"] + 1
        finally:
            _leave(node)
        metrics = {
            "calls": calls["n"],
            "copy": id(copy_token) % 2**31,
            "thread": threading.get_ident() % 2**31,
            "torch-threads": torch.get_num_threads(),
        }
        return Message(RecordDict({"m": MetricRecord(metrics)}), reply_to=message)

    return app


@pytest.fixture
def grid() -> Iterator[ThreadedGrid]:
    with ThreadedGrid(_sleepy_app(0.02), num_nodes=10, num_workers=2) as threaded:
        yield threaded


def _messages(grid: ThreadedGrid, partitions: list[int]) -> list[Message]:
    return [Message(RecordDict(), grid.get_node_ids()[p], "train") for p in partitions]


def test_each_worker_runs_its_own_copy_of_the_client_app_on_its_cpu_share() -> None:
    before = torch.get_num_threads()
    with ThreadedGrid(_sleepy_app(0.05), num_nodes=8, num_workers=2) as grid:
        metrics = [r.content["m"] for r in grid.send_and_receive(_messages(grid, list(range(8))))]
    copy_of_thread = {m["thread"]: m["copy"] for m in metrics}
    assert len(copy_of_thread) == 2 and len(set(copy_of_thread.values())) == 2
    assert all(copy_of_thread[m["thread"]] == m["copy"] for m in metrics)
    assert {m["torch-threads"] for m in metrics} == {1}
    assert torch.get_num_threads() == before  # restored by shutdown


def test_messages_to_a_busy_node_wait_and_run_in_order(grid: ThreadedGrid) -> None:
    replies = list(grid.send_and_receive(_messages(grid, [3, 3, 3, 4, 5])))
    assert not [r.error.reason for r in replies if r.has_error()]
    node = grid.get_node_ids()[3]
    calls = [r.content["m"]["calls"] for r in replies if r.metadata.src_node_id == node]
    assert calls == [1, 2, 3]


def test_replies_stream_with_two_messages_per_worker_in_flight(grid: ThreadedGrid) -> None:
    replies = grid.stream_replies(_messages(grid, list(range(10))))
    next(replies)
    time.sleep(0.3)  # the workers finish what they were given, then wait for the strategy
    assert len(_events) == 4
    assert len(list(replies)) == 9 and len(_events) == 10


def test_a_strategy_that_stops_early_leaves_no_client_running(grid: ThreadedGrid) -> None:
    replies = grid.stream_replies(_messages(grid, list(range(10))))
    next(replies)
    replies.close()
    started = len(_events)
    time.sleep(0.1)
    assert not _active and len(_events) == started <= 4


def test_a_timeout_answers_the_unstarted_and_replaces_the_late() -> None:
    # The two running clients cannot be interrupted: they finish, but past the deadline
    # their replies are late and become timeouts too.
    with ThreadedGrid(_sleepy_app(1.0), num_nodes=6, num_workers=2) as grid:
        cpu_before = time.process_time()
        replies = list(grid.send_and_receive(_messages(grid, list(range(6))), timeout=0.3))
        cpu_s = time.process_time() - cpu_before
    assert cpu_s < 0.3  # the clients sleep: waiting for them past the deadline costs no CPU
    timed_out = [r for r in replies if r.has_error() and "timeout" in r.error.reason]
    assert len(timed_out) == 6 and len(replies) == 6
    assert sum("late reply" in r.error.reason for r in timed_out) == 2
    assert grid.compute_seconds and min(grid.compute_seconds.values()) >= 1.0


def test_bad_settings_and_an_unpicklable_client_app_are_refused() -> None:
    with pytest.raises(ValueError, match="num_workers and threads_per_worker must be >= 1"):
        ThreadedGrid(_sleepy_app(0), num_nodes=2, num_workers=0)
    app, lock = ClientApp(), threading.Lock()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        with lock:
            return Message(RecordDict(), reply_to=message)

    with pytest.raises(ValueError, match="copies the ClientApp into each worker"):
        ThreadedGrid(app, num_nodes=2)


def _dropout_task() -> TorchTask:
    def partition(partition_id: int, num_partitions: int) -> TensorDataset:
        generator = torch.Generator().manual_seed(partition_id)
        return TensorDataset(torch.randn(8, 4, generator=generator), torch.arange(8) % 2)

    return TorchTask(
        model_fn=lambda: nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.5)),
        loss_fn=nn.CrossEntropyLoss(),
        load_partition=partition,
        batch_size=4,
    )


def _one_round(grid: InlineGrid | ThreadedGrid) -> None:
    initial = ArrayRecord(_dropout_task().model_fn().state_dict())
    FedAvg(seed=0, fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2).start(
        grid=grid, initial_arrays=initial, num_rounds=1, train_config=ConfigRecord({"seed": 0})
    )


def test_a_model_drawing_from_the_global_rng_is_flagged_on_worker_threads() -> None:
    app = make_client_app(_dropout_task())
    with ThreadedGrid(app, num_nodes=2, num_workers=2) as grid:
        with pytest.warns(UserWarning, match=r"Dropout draw\(s\) from torch's global RNG"):
            _one_round(grid)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _one_round(InlineGrid(app, num_nodes=2))
    assert not [w for w in caught if "global RNG" in str(w.message)]
