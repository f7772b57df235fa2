"""TorchClient: any nn.Module becomes a Flower ClientApp without library changes."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedsim.arrays import arrays_of
from fedsim.clients import TorchTask, make_client_app
from fedsim.clients.training import evaluate, shuffled_batches
from fedsim.engine import InlineGrid
from fedsim.strategies import FedAvg


class TinyCNN(nn.Module):
    """A user's own CNN, defined outside the library."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2), 1))


def _two_class_images(partition_id: int, num_partitions: int) -> Dataset:
    """Class 1 images are bright on the left half; class 0 on the right."""
    generator = torch.Generator().manual_seed(partition_id)
    labels = torch.randint(0, 2, (40,), generator=generator)
    images = torch.rand(40, 1, 8, 8, generator=generator) * 0.2
    images[labels == 1, :, :, :4] += 1.0
    images[labels == 0, :, :, 4:] += 1.0
    return TensorDataset(images, labels)


@pytest.mark.parametrize(
    "model_fn",
    [
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2)),
        TinyCNN,
    ],
    ids=["mlp", "cnn"],
)
def test_any_architecture_trains_through_fedavg(model_fn) -> None:
    task = TorchTask(
        model_fn=model_fn,
        loss_fn=nn.CrossEntropyLoss(),
        load_partition=_two_class_images,
        lr=0.1,
        local_epochs=2,
        batch_size=8,
    )
    grid = InlineGrid(make_client_app(task), num_nodes=6)
    torch.manual_seed(0)
    initial = ArrayRecord(model_fn().state_dict())
    strategy = FedAvg(
        seed=0, fraction_train=0.5, min_train_nodes=3, fraction_evaluate=1.0, min_evaluate_nodes=6
    )
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=5)
    assert result.evaluate_metrics_clientapp[5]["accuracy"] > 0.95
    first, last = result.train_metrics_clientapp[1], result.train_metrics_clientapp[5]
    assert last["train_loss"] < first["train_loss"]


def test_a_fedavg_client_keeps_no_state_between_rounds() -> None:
    """A stateless client costs its node no memory once its round is done."""
    task = TorchTask(
        model_fn=lambda: nn.Linear(64, 2),
        loss_fn=nn.CrossEntropyLoss(),
        load_partition=lambda p, n: TensorDataset(
            torch.zeros(4, 64), torch.zeros(4, dtype=torch.long)
        ),
    )
    grid = InlineGrid(make_client_app(task), num_nodes=2)
    content = RecordDict(
        {
            "arrays": ArrayRecord(nn.Linear(64, 2).state_dict()),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    node = grid.get_node_ids()[1]
    for _ in range(3):
        (reply,) = grid.send_and_receive([Message(content, node, "train")])
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert grid.nodes.num_with_state == 0
    assert len(grid.nodes.context(node).state) == 0


def test_a_cohort_decodes_the_global_model_once(monkeypatch) -> None:
    """Every client of a round reads the same payload: decoding it per client wastes time."""
    import fedsim.clients.torch_client as torch_client

    decoded = []

    def counting_arrays_of(record: ArrayRecord) -> dict:
        decoded.append(record)
        return arrays_of(record)

    monkeypatch.setattr(torch_client, "arrays_of", counting_arrays_of)
    task = TorchTask(
        model_fn=lambda: nn.Linear(64, 2),
        loss_fn=nn.CrossEntropyLoss(),
        load_partition=lambda p, n: TensorDataset(
            torch.zeros(4, 64), torch.zeros(4, dtype=torch.long)
        ),
    )
    grid = InlineGrid(make_client_app(task), num_nodes=5)
    strategy = FedAvg(seed=0, fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=5)
    strategy.start(
        grid=grid, initial_arrays=ArrayRecord(nn.Linear(64, 2).state_dict()), num_rounds=2
    )
    assert len(decoded) == 2  # one decode per round, not per client


class _ListDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def test_tensor_fast_path_yields_the_same_batches_as_the_dataloader_reference() -> None:
    x, y = torch.randn(50, 3), torch.arange(50)
    fast = list(
        shuffled_batches(
            TensorDataset(x, y), batch_size=8, generator=torch.Generator().manual_seed(3)
        )
    )
    reference = list(
        shuffled_batches(
            _ListDataset(x, y), batch_size=8, generator=torch.Generator().manual_seed(3)
        )
    )
    assert len(fast) == len(reference) == 7
    for (fx, fy), (rx, ry) in zip(fast, reference, strict=True):
        assert torch.equal(fx, rx) and torch.equal(fy, ry)
    assert sorted(torch.cat([b[1] for b in fast]).tolist()) == list(range(50))


def test_evaluate_matches_hand_computed_loss_and_accuracy() -> None:
    # A fixed linear model scoring class 1 iff x > 0: logits (0, x).
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0], [1.0]]))
    x = torch.tensor([[2.0], [-1.0], [3.0]])
    y = torch.tensor([1, 1, 0])  # correct, wrong, wrong
    metrics = evaluate(
        model,
        TensorDataset(x, y),
        loss_fn=nn.CrossEntropyLoss(),
        batch_size=2,
        device=torch.device("cpu"),
    )
    logits = torch.cat([torch.zeros(3, 1), x], dim=1)
    expected = nn.functional.cross_entropy(logits, y).item()
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)


def test_missing_partition_id_is_explained() -> None:
    task = TorchTask(
        model_fn=lambda: nn.Linear(2, 2),
        loss_fn=nn.CrossEntropyLoss(),
        load_partition=_two_class_images,
    )
    app = make_client_app(task)
    content = RecordDict(
        {"arrays": ArrayRecord(nn.Linear(2, 2).state_dict()), "config": ConfigRecord()}
    )
    message = Message(content, 5, "train")
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(KeyError, match="--node-config 'partition-id=<i> num-partitions=<n>'"):
        app(message, context)
