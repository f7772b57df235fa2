"""Flower's own strategies and wrappers run unchanged on every fedsim engine, to the same bits.

The client and the strategy factories are in ``tests/flower_compat.py``: a
hand-written Message-API ClientApp and every ``Strategy`` subclass that
``flwr.serverapp.strategy`` exports, driven by Flower's ``Strategy.start``.
"""

import inspect
import json
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import strategy as flower

from fedsim.engine import InlineGrid, RayGrid, RayResources, SimulatedGrid, ThreadedGrid
from fedsim.loop import run_rounds
from tests.flower_compat import (
    NUM_NODES,
    NUM_ROUNDS,
    STRATEGIES,
    app,
    initial_arrays,
    partition_data,
    run_strategy,
)

REPO = Path(__file__).resolve().parents[1]
GridFactory = Callable[[ClientApp], SimulatedGrid]
IN_PROCESS: dict[str, GridFactory] = {
    "inline": lambda client_app: InlineGrid(client_app, num_nodes=NUM_NODES),
    "threads": lambda client_app: ThreadedGrid(client_app, num_nodes=NUM_NODES, num_workers=2),
}


def _run_all(grid: SimulatedGrid) -> dict[str, list[np.ndarray]]:
    return {name: run_strategy(name, grid) for name in STRATEGIES}


def _assert_bit_identical(
    finals: dict[str, list[np.ndarray]], reference: dict[str, list[np.ndarray]]
) -> None:
    differ = [
        name
        for name, arrays in finals.items()
        if not all(np.array_equal(a, b) for a, b in zip(arrays, reference[name], strict=True))
    ]
    assert not differ, f"not bit-identical: {differ}"


@pytest.fixture(scope="module")
def inline_finals() -> dict[str, list[np.ndarray]]:
    with InlineGrid(app, num_nodes=NUM_NODES) as grid:
        return _run_all(grid)


def test_every_strategy_flower_exports_is_covered() -> None:
    exported = {
        name
        for name, member in vars(flower).items()
        if inspect.isclass(member)
        and issubclass(member, flower.Strategy)
        and member is not flower.Strategy
    }
    assert exported == set(STRATEGIES)


@pytest.mark.parametrize("engine", list(IN_PROCESS))
def test_send_and_receive_returns_a_sized_reiterable_list_in_node_order(engine: str) -> None:
    with IN_PROCESS[engine](app) as grid:
        nodes = list(grid.get_node_ids())
        content = RecordDict({"arrays": ArrayRecord([np.zeros(0, np.uint8)])})
        messages = [Message(content, node, "train") for node in reversed(nodes)]
        replies = grid.send_and_receive(messages)
        assert len(replies) == NUM_NODES
        assert [r.metadata.src_node_id for r in replies] == nodes
        assert [r.metadata.src_node_id for r in replies] == nodes  # a second pass


def test_every_flower_strategy_trains_and_the_threads_engine_matches_inline_bit_for_bit(
    inline_finals: dict[str, list[np.ndarray]],
) -> None:
    for name, arrays in inline_finals.items():
        assert all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f"), name
        if not name.startswith("FedXgb"):
            assert np.abs(arrays[0]).sum() > 0, f"{name} never moved the model"
    with IN_PROCESS["threads"](app) as grid:
        _assert_bit_identical(_run_all(grid), inline_finals)


@pytest.mark.slow
def test_the_ray_engine_matches_inline_bit_for_bit(
    inline_finals: dict[str, list[np.ndarray]],
) -> None:
    with RayGrid(app, num_nodes=NUM_NODES, resources=RayResources(num_actors=2)) as grid:
        _assert_bit_identical(_run_all(grid), inline_finals)


def _trees(booster: np.ndarray) -> list[dict]:
    return json.loads(booster.tobytes())["learner"]["gradient_booster"]["model"]["trees"]


@pytest.mark.slow
def test_flowers_run_simulation_agrees_within_float32_rounding(
    inline_finals: dict[str, list[np.ndarray]], tmp_path: Path
) -> None:
    """Flower's simulation sums replies in arrival order: the last bits may differ.

    Its XGBoost strategies depend on node ids, which Flower draws at random: bagging
    appends the same trees in another order, and the cyclic strategy's first node
    may hold another partition, so for those the test checks what they must agree on.
    """
    out = tmp_path / "flower.npz"
    done = subprocess.run(
        [sys.executable, "-m", "tests.flower_compat", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and out.exists(), done.stderr[-3000:]
    saved = np.load(out)
    partition_means = {round(float(partition_data(p)[1].mean()), 6) for p in range(NUM_NODES)}
    for name, arrays in inline_finals.items():
        theirs = [saved[f"{name}/{index}"] for index in range(len(arrays))]
        if name == "FedXgbBagging":
            leaves = sorted(tree["leaf"] for tree in _trees(arrays[0]))
            assert sorted(tree["leaf"] for tree in _trees(theirs[0])) == leaves
        elif name == "FedXgbCyclic":
            assert {tree["leaf"] for tree in _trees(theirs[0])} <= partition_means
        else:
            for ours, flowers in zip(arrays, theirs, strict=True):
                np.testing.assert_allclose(ours, flowers, rtol=0, atol=1e-6, err_msg=name)


def _poisoning_app() -> ClientApp:
    """Partition 0 answers with NaN arrays and finite metrics; the others with ones."""
    poisoning = ClientApp()

    @poisoning.train()
    def train(message: Message, context: Context) -> Message:
        value = np.nan if context.node_config["partition-id"] == 0 else 1.0
        arrays = ArrayRecord({"w": Array(np.full(3, value, np.float32))})
        metrics = MetricRecord({"num-examples": 1})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)

    return poisoning


@pytest.fixture(params=list(IN_PROCESS))
def poisoned_grid(request: pytest.FixtureRequest) -> Iterator[SimulatedGrid]:
    with IN_PROCESS[request.param](_poisoning_app()) as grid:
        yield grid


def test_non_finite_arrays_become_error_replies_and_the_model_stays_finite(
    poisoned_grid: SimulatedGrid,
) -> None:
    strategy = flower.FedAvg(fraction_evaluate=0.0, min_available_nodes=NUM_NODES)
    initial = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    result = strategy.start(grid=poisoned_grid, initial_arrays=initial, num_rounds=1)
    np.testing.assert_array_equal(result.arrays["w"].numpy(), np.ones(3, np.float32))

    content = RecordDict({"arrays": initial, "config": ConfigRecord()})
    replies = poisoned_grid.send_and_receive(
        [Message(content, node, "train") for node in poisoned_grid.get_node_ids()]
    )
    (poisoned,) = [r for r in replies if r.has_error()]
    assert poisoned.metadata.src_node_id == poisoned_grid.get_node_ids()[0]
    assert poisoned.error.reason == "non-finite values in array arrays/w"


def test_the_finite_check_can_be_switched_off() -> None:
    with InlineGrid(_poisoning_app(), num_nodes=2, check_finite_arrays=False) as grid:
        content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord()})
        replies = grid.send_and_receive([Message(content, grid.get_node_ids()[0], "train")])
    assert np.isnan(replies[0].content["arrays"]["w"].numpy()).all()


@pytest.mark.parametrize("name", ["FedAdam", "DifferentialPrivacyServerSideAdaptiveClipping"])
def test_fedsims_loop_drives_flowers_strategies_to_what_flowers_start_does(
    name: str, inline_finals: dict[str, list[np.ndarray]]
) -> None:
    with IN_PROCESS["threads"](app) as grid:
        random.seed(0)
        np.random.seed(0)
        final = run_rounds(
            strategy=STRATEGIES[name](),
            grid=grid,
            initial_arrays=initial_arrays(name),
            num_rounds=NUM_ROUNDS,
            train_config=ConfigRecord({"dp-adaptive": "Adaptive" in name}),
        )
    _assert_bit_identical({name: [a.numpy() for a in final.values()]}, inline_finals)
