"""DP-SGD clients: per-sample clipping, seeded noise, a per-node accountant in Context.state."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import TensorDataset

from fedsim import keys
from fedsim.arrays import arrays_of
from fedsim.cli import main
from fedsim.clients import TorchTask, make_client_app
from fedsim.clients.dp_sgd import DPSGD
from fedsim.engine import InlineGrid
from tests.conftest import DEMO_CONFIG

SAMPLES = 40


def _data(partition_id: int, _num_partitions: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(partition_id)
    inputs = torch.randn(SAMPLES, 8, generator=generator) * 10  # large gradients: clipping bites
    return TensorDataset(inputs, torch.randint(0, 2, (SAMPLES,), generator=generator))


def _train(dp: DPSGD, *, rounds: int = 1, seed: int = 0, lr: float = 0.5, batch: int = 10):
    """Train node 0 alone ``rounds`` times from the same start; return updates, grid, replies."""
    task = TorchTask(
        model_fn=lambda: nn.Linear(8, 2), loss_fn=nn.CrossEntropyLoss(), load_partition=_data
    )
    grid = InlineGrid(make_client_app(TorchTask(**{**task.__dict__, "dp_sgd": dp})), num_nodes=1)
    torch.manual_seed(0)
    start = ArrayRecord(nn.Linear(8, 2).state_dict())
    replies = []
    for round_ in range(1, rounds + 1):
        config = ConfigRecord(
            {keys.SEED: seed, keys.SERVER_ROUND: round_, keys.LR: lr, keys.LOCAL_EPOCHS: 1}
        )
        config[keys.BATCH_SIZE] = batch
        content = RecordDict({keys.ARRAYS: start, keys.CONFIG: config})
        (reply,) = grid.send_and_receive([Message(content, grid.get_node_ids()[0], "train")])
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        replies.append(reply)
    before = arrays_of(start)
    after = arrays_of(replies[-1].content[keys.ARRAYS])
    update = np.concatenate([(after[k] - before[k]).ravel() for k in before])
    return update, grid, replies


def test_without_noise_each_step_moves_at_most_lr_times_the_clip_norm() -> None:
    clip, lr, batch = 0.01, 0.5, SAMPLES  # q = 1: one full-batch step per epoch
    update, _, _ = _train(DPSGD(noise_multiplier=0.0, max_grad_norm=clip), lr=lr, batch=batch)
    # The mean of per-sample gradients clipped to C has norm <= C; one step of lr.
    assert 0 < np.linalg.norm(update) <= lr * clip * (1 + 1e-6)
    unclipped, _, _ = _train(DPSGD(noise_multiplier=0.0, max_grad_norm=1e6), lr=lr, batch=batch)
    assert np.linalg.norm(unclipped) > 10 * lr * clip  # the data's gradients are large


def test_noise_is_seeded() -> None:
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)
    first, _, _ = _train(dp, seed=1)
    again, _, _ = _train(dp, seed=1)
    other, _, _ = _train(dp, seed=2)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_each_nodes_epsilon_accumulates_in_its_context_as_opacus_counts_it() -> None:
    dp = DPSGD(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    rounds, batch = 3, 10
    _, grid, replies = _train(dp, rounds=rounds, batch=batch)
    epsilons = [reply.content[keys.METRICS][keys.DP_EPSILON] for reply in replies]
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]
    expected = RDPAccountant()
    # Poisson rate batch / n; an epoch is 1 / rate steps; one epoch per round.
    expected.history = [(1.1, batch / SAMPLES, rounds * SAMPLES // batch)]
    assert epsilons[-1] == pytest.approx(expected.get_epsilon(delta=1e-5), rel=1e-12)
    state = grid.nodes.context(grid.get_node_ids()[0]).state["fedsim.dp-sgd"]
    assert sum(state["steps"]) == rounds * SAMPLES // batch


def test_dp_sgd_config_runs_and_reports_epsilon(tmp_path: Path) -> None:
    sets = [
        "rounds=2", "data.num_clients=10", "strategy.clients_per_round=5", "model.name=logreg",
        "client.dp_sgd=true", "client.dp_noise_multiplier=1.0", "client.local_epochs=1",
        f"output_dir={tmp_path}", "name=dp", "progress=false", "plot=false",
    ]  # fmt: skip
    assert main(["run", DEMO_CONFIG, *[a for s in sets for a in ("--set", s)]]) == 0
    rows = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").open()][1:]
    assert all(row["train_dp-epsilon"] > 0 for row in rows)
