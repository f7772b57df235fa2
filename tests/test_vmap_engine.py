"""The vmap engine computes what the inline engine computes, a cohort at a time.

Every strategy with a batched client form (fedsim's FedAvg with momentum and
weight decay, Flower's own FedAvg, Local SGD, SCAFFOLD, the plug-in guide's
FedProx) runs on both engines over clients of unequal sizes (an empty one, one
smaller than a batch, one of several batches) and must end on the same model.

Tolerance: the batched computation performs the same operations, but a batched
matmul or the masked loss sum may add in another order, about 1 ulp (6e-8
relative) per operation; over these few steps the differences stay near 1e-7
absolute. ``rtol=1e-5`` is the issue's bound; ``atol=1e-6`` covers weights that
pass near zero, where a relative bound means nothing.
"""

import importlib.util
import logging
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from fedsim.clients import TorchTask
from fedsim.clients.client_app import CohortApp, make_apps
from fedsim.clients.dp_sgd import DPSGD
from fedsim.engine import InlineGrid
from fedsim.engine.simulated import SimulatedGrid
from fedsim.engine.vmap import VmapGrid
from fedsim.loop import RoundReport, run_rounds
from fedsim.strategies import SCAFFOLD, FedAvg, LocalSGD

SIZES = (0, 5, 9, 24, 41, 17)  # partition sizes: empty, under a batch, several batches
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "custom-strategy.md"


def _data(partition: int, _count: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(partition)
    size = SIZES[partition]
    return TensorDataset(torch.randn(size, 6, generator=generator), torch.arange(size) % 3)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _task(model_fn: Callable[[], nn.Module] = _mlp, **options: object) -> TorchTask:
    settings: dict[str, object] = {"lr": 0.1, "local_epochs": 2, "batch_size": 8, **options}
    return TorchTask(
        model_fn=model_fn,
        loss_fn=nn.CrossEntropyLoss(),
        load_partition=_data,
        **settings,  # type: ignore[arg-type]
    )


def _momentum_sgd(params, lr: float) -> torch.optim.Optimizer:  # type: ignore[no-untyped-def]
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-3)


def _guide_fedprox() -> ModuleType:
    """The plug-in guide's FedProx module, exactly as the page writes it."""
    blocks = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), re.MULTILINE | re.DOTALL)
    spec = importlib.util.spec_from_loader("guide_fedprox", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["guide_fedprox"] = module  # dataclasses look their module up
    exec(compile(blocks[0], str(GUIDE), "exec"), module.__dict__)  # noqa: S102
    return module


FEDPROX = _guide_fedprox()
COHORT = {"min_train_nodes": 4, "min_available_nodes": 4}
NO_EVALUATION = {"fraction_evaluate": 0.0, "min_evaluate_nodes": 0}
STRATEGIES: dict[str, tuple[Callable[[], object], dict[str, object]]] = {
    "fedavg-momentum-wd": (
        lambda: FedAvg(fraction_train=0.7, **COHORT, **NO_EVALUATION),
        {"optimizer_fn": _momentum_sgd},
    ),
    "flower-fedavg": (
        lambda: FlowerFedAvg(fraction_train=0.7, **COHORT, **NO_EVALUATION),
        {},
    ),
    "local-sgd": (
        lambda: LocalSGD(
            lr=0.1, batch_size=8, local_steps=3, fraction_train=0.7, **COHORT, **NO_EVALUATION
        ),  # fmt: skip
        {},
    ),
    "scaffold": (
        lambda: SCAFFOLD(
            lr=0.1, batch_size=8, local_steps=3, fraction_train=0.7, **COHORT, **NO_EVALUATION
        ),  # fmt: skip
        {},
    ),
    "fedprox": (
        lambda: FEDPROX.FedProx(mu=0.5, fraction_train=0.7, **COHORT, **NO_EVALUATION),
        {},
    ),
}


class _Losses:
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_round(self, report: RoundReport) -> None:
        self.rows.append(dict(report.train))


def _run(
    grid: SimulatedGrid, strategy: object, task: TorchTask, rounds: int = 3
) -> tuple[dict[str, np.ndarray], list[dict[str, float]]]:
    torch.manual_seed(0)
    random.seed(0)  # Flower's own strategies sample cohorts with Python's random
    initial = ArrayRecord(task.model_fn().state_dict())
    losses = _Losses()
    with grid:
        arrays = run_rounds(
            strategy=strategy,  # type: ignore[arg-type]
            grid=grid,
            initial_arrays=initial,
            num_rounds=rounds,
            train_config=ConfigRecord({"seed": 5}),
            observers=[losses],
        )
    return {name: array.numpy() for name, array in arrays.items()}, losses.rows


def _apps(task: TorchTask, strategy: object) -> tuple[ClientApp, CohortApp]:
    return make_apps(task, algorithms=[type(strategy)])


class _Counted:
    """Count the clients each cohort form answers."""

    def __init__(self, cohort_app: CohortApp) -> None:
        self.clients = 0
        for message_type, handler in list(cohort_app.handlers.items()):
            cohort_app.handlers[message_type] = self._counting(handler)

    def _counting(self, handler: Callable) -> Callable:  # type: ignore[type-arg]
        def counted(client, messages, contexts):  # type: ignore[no-untyped-def]
            answers = handler(client, messages, contexts)
            self.clients += sum(answer is not None for answer in answers)
            return answers

        return counted


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_batched_strategy_ends_where_the_inline_engine_ends(name: str) -> None:
    make_strategy, options = STRATEGIES[name]
    task = _task(**options)
    strategy = make_strategy()
    inline_app, _ = _apps(task, strategy)
    want, want_losses = _run(InlineGrid(inline_app, num_nodes=len(SIZES)), strategy, task)
    strategy = make_strategy()
    client_app, cohort_app = _apps(task, strategy)
    counted = _Counted(cohort_app)
    grid = VmapGrid(client_app, cohort_app, num_nodes=len(SIZES))
    got, got_losses = _run(grid, strategy, task)
    assert grid.batching and counted.clients >= 3 * 3  # 4 a round, but the empty one
    for key, value in want.items():
        assert not np.array_equal(value, _run_start(task)[key])  # it trained
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert [r.keys() for r in got_losses] == [r.keys() for r in want_losses]
    for have, expected in zip(got_losses, want_losses, strict=True):
        for metric, value in expected.items():
            assert have[metric] == pytest.approx(value, rel=1e-5, abs=1e-9), metric


def _run_start(task: TorchTask) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return {name: value.numpy() for name, value in task.model_fn().state_dict().items()}


def test_the_same_seed_gives_the_same_model_and_chunks_change_nothing() -> None:
    make_strategy, options = STRATEGIES["scaffold"]
    task = _task(**options)
    runs = []
    for chunk in (0, 0, 2):
        client_app, cohort_app = _apps(task, make_strategy())
        grid = VmapGrid(client_app, cohort_app, num_nodes=len(SIZES), chunk_size=chunk)
        assert grid.chunk_size == (chunk or grid.chunk_size) and grid.chunk_size >= 1
        runs.append(_run(grid, make_strategy(), task)[0])
    for key in runs[0]:
        assert np.array_equal(runs[0][key], runs[1][key])  # bit for bit, run to run
        np.testing.assert_allclose(runs[2][key], runs[0][key], rtol=1e-5, atol=1e-6)


class _DataDependent(nn.Module):
    """A model whose forward branches on its input's values: ``vmap`` cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x)
        return out * 2 if out.sum() > 0 else out


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"model_fn": lambda: nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3))},
         "'1' (BatchNorm1d) updates its buffers"),
        ({"model_fn": lambda: nn.Sequential(nn.Linear(6, 3), nn.Dropout(0.3))},
         "'1' (Dropout) draws from torch's RNG"),
        ({"dp_sgd": DPSGD(noise_multiplier=0.5, max_grad_norm=1.0)},
         "client.dp_sgd trains each client with Poisson batches"),
        ({"optimizer_fn": lambda params, lr: torch.optim.Adam(params, lr=lr)},
         "the client optimizer Adam"),
        ({"model_fn": _DataDependent}, "batched training failed"),
    ],
    ids=["batchnorm", "dropout", "dp-sgd", "adam", "data-dependent-control-flow"],
)  # fmt: skip
def test_what_cannot_be_batched_says_why_in_one_line_and_runs_as_inline(
    options: dict[str, object], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    task = _task(**options)
    strategy = FedAvg(fraction_train=0.7, **COHORT, **NO_EVALUATION)
    want, _ = _run(InlineGrid(_apps(task, strategy)[0], num_nodes=len(SIZES)), strategy, task)
    strategy = FedAvg(fraction_train=0.7, **COHORT, **NO_EVALUATION)
    with caplog.at_level(logging.WARNING, logger="fedsim.engine.vmap"):
        grid = VmapGrid(*_apps(task, strategy), num_nodes=len(SIZES))
        got, _ = _run(grid, strategy, task)
    lines = [r.getMessage() for r in caplog.records if r.name == "fedsim.engine.vmap"]
    assert len(lines) == 1 and reason in lines[0] and "\n" not in lines[0], lines
    assert "one at a time" in lines[0] and not grid.batching
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)  # the sequential path itself


def test_a_worker_without_samples_gets_the_sequential_error_reply() -> None:
    strategy = LocalSGD(lr=0.1, batch_size=8, local_steps=2, min_train_nodes=6,
                        min_available_nodes=6, **NO_EVALUATION)  # fmt: skip
    task = _task()
    client_app, cohort_app = _apps(task, strategy)
    with VmapGrid(client_app, cohort_app, num_nodes=len(SIZES)) as grid:
        content = strategy.send(1, grid.get_node_ids(), "train.local",
                                strategy.exchange_config(ConfigRecord({"seed": 1})),
                                arrays=ArrayRecord(_mlp().state_dict()))  # fmt: skip
        replies = grid.send_and_receive(content)
    errors = [r for r in replies if r.has_error()]
    assert len(errors) == 1 and errors[0].metadata.src_node_id == grid.get_node_ids()[0]
    assert "need as many inputs as targets, at least one" in (errors[0].error.reason or "")
    assert all(r.has_content() for r in replies if not r.has_error())


def test_a_timeout_answers_unstarted_messages_with_errors() -> None:
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=6, min_available_nodes=6)
    task = _task()
    with VmapGrid(*_apps(task, strategy), num_nodes=len(SIZES), chunk_size=2) as grid:
        messages = [
            Message(_content(), node, "train") for node in grid.get_node_ids()
        ]  # fmt: skip
        replies = list(grid.stream_replies(messages, timeout=0.0))
    assert len(replies) == len(SIZES)
    assert all(r.has_error() and "round timeout" in (r.error.reason or "") for r in replies)


def _content():  # type: ignore[no-untyped-def]
    from flwr.app import RecordDict

    return RecordDict(
        {"arrays": ArrayRecord(_mlp().state_dict()), "config": ConfigRecord({"seed": 1})}
    )


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        ({"faults": {"fraction": 0.2, "kinds": "nan"}},
         "engine vmap: client mods (fault injection) wrap each message; clients train one "
         "at a time"),
        ({"privacy": {"secure_aggregation": True}},
         "engine vmap: secure aggregation masks every update; clients train one at a time"),
        ({"strategy": {"name": "bvr-l-sgd"}},
         "engine vmap: BVRLSGD's train.anchor, train.estimate, train.local have no batched "
         "form and run one at a time"),
        ({}, None),
    ],
    ids=["client-mods", "secure-aggregation", "bvr-l-sgd", "fedavg"],
)  # fmt: skip
def test_fedsim_run_names_what_the_vmap_engine_will_not_batch_in_one_line(
    tmp_path: Path, settings: dict[str, object], line: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    from fedsim.config import parse_config
    from fedsim.runner import run_experiment

    raw: dict[str, object] = {
        "rounds": 1, "output_dir": str(tmp_path), "progress": False, "plot": False,
        "data": {"num_clients": 8}, "engine": {"name": "vmap"},
        "strategy": {"clients_per_round": 4},
    }  # fmt: skip
    for section, values in settings.items():
        raw[section] = {**raw.get(section, {}), **values}  # type: ignore[dict-item]
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        summary = run_experiment(parse_config(raw))
    assert summary["status"] == "completed" and summary["engine"] == "vmap"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine vmap")]
    assert lines == ([line] if line else [])
