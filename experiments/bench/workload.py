"""The benchmark's workloads, defined once for every system that runs them.

W1 is FedAvg on a 105,866-parameter CNN (``fedsim.models.cnn``: two conv and two
linear layers) over synthetic 1x28x28 inputs with 10 classes; each client holds
64 samples and trains 1 local epoch of SGD (batch 32, lr 0.05) per round, for 5
rounds, without evaluation. W1a samples 20 of 100 clients per round, W1b 100 of
1000. D1b is W1b with a model 10x smaller: an MLP (64-128-10, 9,610 parameters: 11x fewer)
on scikit-learn's embedded 8x8 digits, each client 64 digits drawn from the
1,797 by its id.

Client data is generated on demand from the client's id (nothing is generated up
front), so every system pays the same data cost. Cohorts, batch order and the
initial model come from fedsim's seeding (``fedsim.seeding``), so a system that
uses these helpers computes exactly what fedsim does and ends on the same
weights; :func:`reference_fedavg` is W1 written as the plainest PyTorch loop.

The scale workloads probe fedsim alone: a tiny model over populations of 10^3
and 10^6 clients, and a 1M-parameter model at cohorts of 10 and 500.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from flwr.app import UserConfig
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from fedsim import keys
from fedsim.data.datasets import CentralDataset
from fedsim.models import cnn, mlp
from fedsim.seeding import SERVER_NODE, derive_seed, numpy_rng, torch_generator

SEED = 0
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
SAMPLES_PER_CLIENT = 64
BATCH_SIZE = 32
LR = 0.05
LOCAL_EPOCHS = 1
ROUNDS = 5


@dataclass(frozen=True)
class Workload:
    """A population, the cohort sampled from it each round, and the model it trains."""

    name: str
    num_clients: int
    clients_per_round: int
    local_epochs: int = LOCAL_EPOCHS
    model: str = "cnn"  # "cnn" (W1's) or "digits-mlp"

    def __post_init__(self) -> None:
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(
                f"{self.name}: cannot sample {self.clients_per_round} of {self.num_clients}"
            )


WORKLOADS = {
    "W1a": Workload("W1a", num_clients=100, clients_per_round=20),
    "W1b": Workload("W1b", num_clients=1000, clients_per_round=100),
    # W1b with no local training: clients load data and the model and reply; what is
    # left of a round is each system's own per-client work.
    "W1b-0": Workload("W1b-0", num_clients=1000, clients_per_round=100, local_epochs=0),
    "D1b": Workload("D1b", num_clients=1000, clients_per_round=100, model="digits-mlp"),
}


def make_model(model: str = "cnn") -> nn.Module:
    """Return a fresh W1 model (105,866 parameters) or the digits MLP (9,610)."""
    if model == "digits-mlp":
        return mlp((1, 8, 8), NUM_CLASSES, hidden=128)
    return cnn(INPUT_SHAPE, NUM_CLASSES)


def client_tensors(client: int, model: str = "cnn") -> tuple[Tensor, Tensor]:
    """Return client ``client``'s 64 inputs and labels: W1's synthetic images, or digits."""
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + client)
    if model == "digits-mlp":
        images, labels = _digits()
        index = torch.randperm(len(labels), generator=generator)[:SAMPLES_PER_CLIENT]
        return images[index], labels[index]
    inputs = torch.randn(SAMPLES_PER_CLIENT, *INPUT_SHAPE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (SAMPLES_PER_CLIENT,), generator=generator)
    return inputs, labels


@cache
def _digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 embedded 8x8 digits, scaled to [0, 1], as ``(N, 1, 8, 8)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.long)


@dataclass(frozen=True)
class ClientData:
    """A workload's client data as ``fedsim.clients.TorchTask.load_partition`` takes it."""

    model: str = "cnn"

    def __call__(self, partition_id: int, num_partitions: int = 0) -> TensorDataset:
        """Return client ``partition_id``'s samples."""
        del num_partitions  # a client's data depends on its id alone
        return TensorDataset(*client_tensors(partition_id, self.model))


#: W1's client data.
client_dataset = ClientData()


def node_data(node_config: UserConfig) -> TensorDataset:
    """W1 client data as a ``data.load_partition`` hook: made from the node's partition id."""
    return client_dataset(int(node_config[keys.PARTITION_ID]))


def central_data(num_clients: int = 20) -> CentralDataset:
    """W1's shapes as a ``data.dataset`` loader, for a config run of W1 (a deployment).

    The clients' data comes from :func:`node_data`; this gives the server the input
    shape, the classes and a 64-sample test split, and a train split of
    ``num_clients`` clients' worth that the config's partitioner splits unused.
    """
    train = [client_tensors(client) for client in range(num_clients)]
    test_x, test_y = client_tensors(10**6)
    return CentralDataset(
        train_x=torch.cat([x for x, _ in train]),
        train_y=torch.cat([y for _, y in train]),
        test_x=test_x,
        test_y=test_y,
        num_classes=NUM_CLASSES,
    )


def seeded_init(model_fn: Callable[[], nn.Module], seed: int) -> dict[str, Tensor]:
    """Return the global model before round 1, as ``fedsim.experiment.initial_arrays``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 0, SERVER_NODE, "init"))
        return model_fn().state_dict()


def initial_state(seed: int, model: str = "cnn") -> dict[str, Tensor]:
    """Return the workload model's global state before round 1."""
    return seeded_init(lambda: make_model(model), seed)


def cohort(workload: Workload, *, seed: int, round_: int) -> list[int]:
    """Return the clients (partition ids, ascending) fedsim's FedAvg trains in ``round_``.

    The same draw as ``fedsim.strategies.sampling.sample_cohort`` over the node ids.
    """
    rng = numpy_rng(seed, round_, SERVER_NODE, "sample-train")
    draw = rng.choice(workload.num_clients, size=workload.clients_per_round, replace=False)
    return np.sort(draw).tolist()


def shuffle_generator(*, seed: int, round_: int, client: int) -> torch.Generator:
    """Return the generator a fedsim client draws its batch order from in ``round_``."""
    return torch_generator(seed, round_, client, "shuffle")


def reference_fedavg(
    workload: Workload,
    *,
    rounds: int,
    seed: int,
    on_round: Callable[[], None],
    device: str = "cpu",
) -> dict[str, Tensor]:
    """Run W1 as the plainest FedAvg loop in PyTorch; return the final global state.

    One model is reloaded with the global state for each client of the round's
    cohort; the new global state is the example-weighted mean of the clients'
    states, summed in float64 as fedsim's aggregation does. ``on_round`` is called
    before round 1 and after every round. On ``device`` the model, each client's
    data and the sums live there (the state comes back on the CPU).
    """
    model, loss_fn = make_model(workload.model).to(device), nn.CrossEntropyLoss()
    state = {k: v.to(device) for k, v in initial_state(seed, workload.model).items()}
    on_round()
    for round_ in range(1, rounds + 1):
        sums = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in state.items()}
        total = 0
        for client in cohort(workload, seed=seed, round_=round_):
            inputs, labels = (t.to(device) for t in client_tensors(client, workload.model))
            model.load_state_dict(state)
            optimizer = torch.optim.SGD(model.parameters(), lr=LR)
            shuffle = shuffle_generator(seed=seed, round_=round_, client=client)
            for _ in range(workload.local_epochs):
                order = torch.randperm(len(labels), generator=shuffle).to(device)
                for index in order.split(BATCH_SIZE):
                    optimizer.zero_grad()
                    loss_fn(model(inputs[index]), labels[index]).backward()
                    optimizer.step()
            with torch.no_grad():
                for name, value in model.state_dict().items():
                    sums[name].add_(value, alpha=len(labels))  # in float64, in place
            total += len(labels)
        state = {name: (value / total).float() for name, value in sums.items()}
        on_round()
    return {name: value.cpu() for name, value in state.items()}


# --------------------------------------------------------------------------- scale


@dataclass(frozen=True)
class ScaleCase:
    """A fedsim inline run that probes how start-up and memory scale."""

    label: str
    num_features: int  # the model is nn.Linear(num_features, num_classes)
    num_classes: int
    samples_per_client: int  # one batch: each client takes a single SGD step
    num_clients: int
    cohort: int
    rounds: int

    def model(self) -> nn.Module:
        """Return a fresh model of this case."""
        return nn.Linear(self.num_features, self.num_classes)

    def client_dataset(self, partition_id: int, num_partitions: int = 0) -> TensorDataset:
        """Client data, generated from the client's id alone."""
        del num_partitions
        generator = torch.Generator().manual_seed(partition_id)
        inputs = torch.randn(self.samples_per_client, self.num_features, generator=generator)
        labels = torch.randint(0, self.num_classes, (self.samples_per_client,), generator=generator)
        return TensorDataset(inputs, labels)


SCALE_CASES = {
    "population-1e3": ScaleCase("tiny model, 10^3 clients", 10, 2, 16, 10**3, 100, 3),
    "population-1e6": ScaleCase("tiny model, 10^6 clients", 10, 2, 16, 10**6, 100, 3),
    # nn.Linear(1000, 1000): 1,001,000 parameters, 4 MB per copy.
    "cohort-10": ScaleCase("1M-param model, cohort 10", 1000, 1000, 8, 1000, 10, 2),
    "cohort-500": ScaleCase("1M-param model, cohort 500", 1000, 1000, 8, 1000, 500, 2),
}
