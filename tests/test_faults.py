"""Faults injected from config are detected, counted per kind, and never reach the model.

The check of "never reach the model": a run with faults ends on the same model, bit for
bit, as a run whose same clients simply lose their replies (an error reply in place of
the client's, after the same local training, so that clients that keep state, like
SCAFFOLD's, keep the same state in both runs).
"""

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fedsim import keys
from fedsim.algorithm import ClientMod, message_types
from fedsim.arrays import to_array_record
from fedsim.clients import make_client_app
from fedsim.composition import strategy_class
from fedsim.config import ConfigError, RunConfig, parse_config
from fedsim.engine import InlineGrid, ThreadedGrid
from fedsim.engine.execute import error_reply, failure_kind, mismatched_arrays
from fedsim.experiment import build_task, run_on_grid
from fedsim.faults import FAULT_KINDS, FaultPlan
from fedsim.records import config_number, get_record
from fedsim.runner import engine_client_app

CORRUPTING = "nan,inf,shape,dtype,huge,missing"


def config_of(folder: Path, name: str, **tables: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "name": name,
        "rounds": 3,
        "progress": False,
        "plot": False,
        "checkpoint_every": 0,
        "output_dir": str(folder),
        "data": {"num_clients": 12},
        "model": {"name": "mlp", "params": {"hidden": 16}},
        "client": {"local_epochs": 1, "batch_size": 16},
        "strategy": {"clients_per_round": 6},
        "engine": {"torch_threads": 1},
    }
    for table, values in tables.items():
        raw[table] = {**raw.get(table, {}), **values} if isinstance(values, dict) else values
    return parse_config(raw)


def dropping_app(config: RunConfig, plan: FaultPlan) -> ClientApp:
    """The config's ClientApp, whose plan-selected clients train and then lose their reply."""

    def drop(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        if message.metadata.message_type.partition(".")[0] != "train":
            return reply
        config = get_record(message.content, keys.CONFIG, ConfigRecord)
        round_ = config_number(config, keys.SERVER_ROUND, int)
        if plan.fault_for(round_, int(context.node_config[keys.PARTITION_ID])) is None:
            return reply
        return error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "dropped")

    cls = strategy_class(config)
    mod = ClientMod(drop, handles=message_types([cls]), name="drop")
    return make_client_app(build_task(config), [mod], algorithms=[cls])


GRIDS: dict[str, Callable[[ClientApp, RunConfig], Any]] = {
    "inline": lambda app, c: InlineGrid(app, num_nodes=c.data.num_clients, torch_threads=1),
    "threads": lambda app, c: ThreadedGrid(app, num_nodes=c.data.num_clients, num_workers=2),
}
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "scaffold": {"strategy": {"name": "scaffold", "local_steps": 3}},
    "bvr-l-sgd": {"strategy": {"name": "bvr-l-sgd", "local_steps": 3, "stage_rounds": 2}},
    "central-dp": {"privacy": {"central_dp": True, "noise_multiplier": 0.5}},
}


def model_of(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


@pytest.mark.parametrize("engine", sorted(GRIDS))
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_faulty_clients_cost_the_model_exactly_their_replies(
    strategy: str, engine: str, tmp_path: Path
) -> None:
    tables = STRATEGIES[strategy]
    faulty = config_of(tmp_path, "faulty", faults={"fraction": 0.4, "kinds": CORRUPTING}, **tables)
    clean = config_of(tmp_path, "dropped", **tables)
    plan = FaultPlan(0.4, faulty.faults.kind_list, faulty.seed, faulty.faults.hang_s)

    with GRIDS[engine](engine_client_app(faulty), faulty) as grid:
        summary = run_on_grid(faulty, grid, engine=engine)
    with GRIDS[engine](dropping_app(clean, plan), clean) as grid:
        dropped = run_on_grid(clean, grid, engine=engine)

    assert summary["failures"] == dropped["failures"] > 0
    # BVR-L-SGD's later exchanges fail ('raised') for a node that lost its anchor reply,
    # in both runs alike.
    kinds = summary["failures_by_kind"]
    assert set(kinds) <= {"non-finite", "malformed", "raised"} and kinds.keys() - {"raised"}
    assert sum(summary["failures_by_kind"].values()) == summary["failures"]
    faulty_model, clean_model = model_of(tmp_path / "faulty"), model_of(tmp_path / "dropped")
    assert all(torch.equal(faulty_model[k], clean_model[k]) for k in clean_model)
    assert all(torch.isfinite(t).all() for t in faulty_model.values())


@pytest.mark.parametrize("kind", [k for k in FAULT_KINDS if k not in ("hang", "kill")])
def test_each_fault_is_counted_as_the_kind_it_is_detected_as(kind: str, tmp_path: Path) -> None:
    config = config_of(tmp_path, kind, faults={"fraction": 1.0, "kinds": kind})
    with InlineGrid(engine_client_app(config), num_nodes=12, torch_threads=1) as grid:
        summary = run_on_grid(config, grid, engine="inline")
    assert summary["failures_by_kind"] == {FAULT_KINDS[kind]: 3 * 6}  # every reply of 3 rounds
    rows = [json.loads(line) for line in (tmp_path / kind / "metrics.jsonl").open()]
    assert all(row[f"failures_{FAULT_KINDS[kind]}"] == 6 for row in rows[1:])
    assert summary["status"] == "completed"  # the model stayed the initial one, finite


def test_a_hung_client_times_out_and_the_others_finish(tmp_path: Path) -> None:
    # Threads: the hung client's worker sleeps; the other worker runs everyone else. The
    # deadline leaves room for a cold worker's start (unpickling the app, building the model).
    faults = {"fraction": 0.1, "kinds": "hang", "hang_s": 5.0}
    every = {"clients_per_round": 12}
    config = config_of(
        tmp_path, "hung", faults=faults, engine={"timeout_s": 3.0}, strategy=every, rounds=1, seed=2
    )
    plan = FaultPlan(0.1, ("hang",), config.seed, 5.0)
    assert [p for p in range(12) if plan.fault_for(1, p)] == [2]  # seed 2: one client hangs
    clean = config_of(tmp_path, "dropped", strategy=every, rounds=1, seed=2)
    with ThreadedGrid(engine_client_app(config), num_nodes=12, num_workers=2) as grid:
        summary = run_on_grid(config, grid, engine="threads")
    with ThreadedGrid(dropping_app(clean, plan), num_nodes=12, num_workers=2) as grid:
        dropped = run_on_grid(clean, grid, engine="threads")
    assert dropped["failures"] == 1 and summary["failures_by_kind"] == {"timeout": 1}
    hung, expected = model_of(tmp_path / "hung"), model_of(tmp_path / "dropped")
    assert all(torch.equal(hung[k], expected[k]) for k in expected)


def test_an_inline_reply_that_comes_after_the_deadline_is_a_timeout(tmp_path: Path) -> None:
    faults = {"fraction": 1.0, "kinds": "hang", "hang_s": 0.3}
    config = config_of(tmp_path, "late", faults=faults, engine={"timeout_s": 0.1}, rounds=1)
    with InlineGrid(engine_client_app(config), num_nodes=12, torch_threads=1) as grid:
        summary = run_on_grid(config, grid, engine="inline")
    assert summary["failures_by_kind"] == {"timeout": 6}  # the first late, the rest unstarted


def test_the_plan_is_seeded_and_faults_the_asked_fraction() -> None:
    plan = FaultPlan(0.3, ("raise", "nan"), seed=7, hang_s=1.0)
    draws = [plan.fault_for(r, p) for r in range(1, 51) for p in range(200)]
    assert draws == [plan.fault_for(r, p) for r in range(1, 51) for p in range(200)]
    n = len(draws)
    faulty = sum(d is not None for d in draws)
    assert abs(faulty / n - 0.3) <= 5 * np.sqrt(0.3 * 0.7 / n)  # 5 standard errors
    nan = sum(d == "nan" for d in draws)
    assert abs(nan / faulty - 0.5) <= 5 * np.sqrt(0.25 / faulty)
    other_seed = FaultPlan(0.3, ("raise", "nan"), seed=8, hang_s=1.0)
    assert [other_seed.fault_for(r, p) for r in range(1, 51) for p in range(200)] != draws


@pytest.mark.parametrize(
    ("faults", "engine", "expected"),
    [
        ({"kinds": "rase"}, {}, "faults.kinds: 'rase' is not a fault (did you mean 'raise'?)"),
        ({"fraction": 0.1, "kinds": "kill"}, {}, "'kill' kills the client's worker process"),
        ({"fraction": 0.1, "kinds": "hang", "hang_s": 2.0}, {"timeout_s": 5.0}, "must exceed"),
        ({"fraction": 1.5}, {}, "faults.fraction = 1.5 is out of range"),
    ],
)
def test_fault_settings_are_checked_in_one_line(
    faults: dict[str, Any], engine: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        config_of(tmp_path, "bad", faults=faults, engine=engine)


def test_a_reply_must_hold_the_arrays_it_was_sent() -> None:
    from flwr.app import RecordDict

    sent = RecordDict({"arrays": to_array_record({"w": np.zeros((2, 3), np.float32)})})
    same = RecordDict({"arrays": to_array_record({"w": np.ones((2, 3), np.float32)})})
    other = RecordDict({"gradients": to_array_record({"g": np.zeros(7)})})  # a name of its own
    cast = RecordDict({"arrays": to_array_record({"w": np.zeros((2, 3), np.float64)})})
    assert mismatched_arrays(sent, same) is None and mismatched_arrays(sent, other) is None
    reason = mismatched_arrays(sent, cast)
    assert reason is not None and reason.startswith("malformed reply: arrays/w is ((2, 3)")
    error = error_reply(Message(sent, 1, "train"), ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason)
    assert failure_kind(error.error) == "malformed"


@pytest.mark.slow
def test_on_ray_faults_and_killed_workers_cost_exactly_their_replies(tmp_path: Path) -> None:
    """Every strategy's faults on Ray, against inline runs that drop the same replies.

    The inline engine on one torch thread computes what Ray's one-CPU actors do
    (tests/test_ray_engine.py), so one Ray run per strategy suffices. FedAvg's faults
    include killed workers, which only Ray has; the stateful strategies get the
    corrupting kinds: a killed client never ends its training, so unlike the dropping
    run it keeps its old state (SCAFFOLD's control variate, BVR-L-SGD's anchor).
    """
    import ray

    from fedsim.engine.ray_grid import RayGrid, RayResources, release_kept_actors

    assert not ray.is_initialized(), "this test starts and stops its own Ray"
    resources = RayResources(num_cpus=1, num_actors=2)
    try:
        for strategy, tables in sorted(STRATEGIES.items()):
            kinds = "nan,shape,kill" if strategy == "fedavg" else CORRUPTING
            faults = {"fraction": 0.4, "kinds": kinds}
            faulty = config_of(tmp_path, f"{strategy}-faulty", faults=faults,
                               **tables, engine={"name": "ray"})  # fmt: skip
            clean = config_of(tmp_path, f"{strategy}-dropped", **tables)
            plan = FaultPlan(0.4, faulty.faults.kind_list, faulty.seed, faulty.faults.hang_s)
            # keep_actors: the next strategy's grid reuses this Ray (its app needs new actors).
            app = engine_client_app(faulty)
            with RayGrid(app, num_nodes=12, resources=resources, keep_actors=True) as grid:
                summary = run_on_grid(faulty, grid, engine="ray")
            with GRIDS["inline"](dropping_app(clean, plan), clean) as grid:
                dropped = run_on_grid(clean, grid, engine="inline")

            assert summary["failures"] == dropped["failures"] > 0, strategy
            if strategy == "fedavg":
                assert summary["failures_by_kind"].get("crashed", 0) > 0
            got, expected = (model_of(tmp_path / f"{strategy}-{run}")
                             for run in ("faulty", "dropped"))  # fmt: skip
            assert all(torch.equal(got[k], expected[k]) for k in expected), strategy
    finally:
        release_kept_actors()
