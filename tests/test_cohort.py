"""The batched cohort trainer against the sequential client loop it replaces.

The reference is built from the pieces ``TorchClient.train`` uses: a fresh model
loaded with the global state per client, a fresh ``torch.optim.SGD``, and
``train_epochs`` shuffling with the client's ``torch_generator(seed, round,
partition, "shuffle")``. Clients have unequal sizes, so short last batches and
clients that finish early (padded, masked steps) are exercised.

Tolerance: the cohort computes the same operations, but a batched matmul, a
grouped convolution or the masked loss sum may add in another order, about 1
ulp (6e-8 relative) per operation. Over the 8 steps of the largest client the
measured differences stay below 1e-7 absolute, about 2% of what
``assert_close(rtol=1e-5, atol=1e-6)`` allows. The optimizer step itself is
compared bit for bit.
"""

import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from fedsim.clients.cohort import SGD, TrainedClient, train_cohort
from fedsim.clients.training import train_epochs
from fedsim.seeding import torch_generator

SIZES = (5, 17, 33, 64)
BATCH, EPOCHS, LR, SEED, ROUND = 16, 2, 0.1, 7, 3


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def datasets(shape: tuple[int, ...], sizes: tuple[int, ...] = SIZES) -> list[Dataset]:
    generator = torch.Generator().manual_seed(0)
    return [
        TensorDataset(torch.randn(n, *shape, generator=generator), torch.randint(0, 10, (n,)))
        for n in sizes
    ]


def generators(partitions: range | list[int]) -> list[torch.Generator]:
    return [torch_generator(SEED, ROUND, partition, "shuffle") for partition in partitions]


def global_model(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(1)
    return build()


def sequential(
    build: Callable[[], nn.Module], data: list[Dataset], **sgd: float
) -> list[TrainedClient]:
    """Train each client one after another, as ``TorchClient.train`` does."""
    start = global_model(build).state_dict()
    results = []
    for dataset, generator in zip(data, generators(range(len(data))), strict=True):
        model = build()
        model.load_state_dict(start)
        loss = train_epochs(
            model,
            dataset,
            loss_fn=nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=LR, **sgd),
            epochs=EPOCHS,
            batch_size=BATCH,
            generator=generator,
            device=torch.device("cpu"),
        )
        results.append(TrainedClient(model.state_dict(), loss))
    return results


def cohort(
    build: Callable[[], nn.Module],
    data: list[Dataset],
    partitions: list[int] | None = None,
    **options: float | None,
) -> list[TrainedClient]:
    return train_cohort(
        global_model(build),
        data,
        loss_fn=nn.CrossEntropyLoss(),
        lr=LR,
        epochs=EPOCHS,
        batch_size=BATCH,
        generators=generators(partitions or range(len(data))),
        **options,  # type: ignore[arg-type]
    )


def assert_bitwise(a: list[TrainedClient], b: list[TrainedClient]) -> None:
    assert [r.loss for r in a] == [r.loss for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.state.keys() == y.state.keys()
        assert all(torch.equal(x.state[k], y.state[k]) for k in x.state)


CASES = {
    "mlp": (mlp, (64,), {}),
    "mlp-momentum-wd": (mlp, (64,), {"momentum": 0.9, "weight_decay": 1e-3}),
    "cnn": (small_cnn, (1, 8, 8), {}),
}


@pytest.mark.parametrize("case", CASES)
def test_each_client_ends_where_its_sequential_training_ends(case: str, one_torch_thread) -> None:
    build, shape, sgd = CASES[case]
    data = datasets(shape)
    expected = sequential(build, data, **sgd)
    got = cohort(build, data, **sgd)
    start = global_model(build).state_dict()
    for want, have in zip(expected, got, strict=True):
        assert have.state.keys() == want.state.keys()
        for name, value in want.state.items():
            assert not torch.equal(value, start[name])  # every client moved
            torch.testing.assert_close(have.state[name], value, rtol=1e-5, atol=1e-6)
        assert have.loss == pytest.approx(want.loss, rel=1e-5)


@pytest.mark.parametrize("case", ["mlp-momentum-wd", "cnn"])
def test_chunks_and_reruns_give_bitwise_identical_results(case: str, one_torch_thread) -> None:
    build, shape, sgd = CASES[case]
    data = datasets(shape)
    whole = cohort(build, data, **sgd)
    assert_bitwise(cohort(build, data, **sgd), whole)
    assert_bitwise(cohort(build, data, chunk_size=2, **sgd), whole)


def test_a_client_without_samples_returns_the_global_model(one_torch_thread) -> None:
    data = datasets((64,), sizes=(17, 0, 5))
    got = cohort(mlp, data, momentum=0.9, weight_decay=1e-3)
    start = global_model(mlp).state_dict()
    assert all(torch.equal(got[1].state[k], v) for k, v in start.items())
    assert got[1].loss == 0.0
    assert not torch.equal(got[0].state["0.weight"], start["0.weight"])
    # The empty client changes nothing for the others, nor does training it alone.
    without = cohort(mlp, data[::2], partitions=[0, 2], momentum=0.9, weight_decay=1e-3)
    assert_bitwise(got[::2], without)
    assert_bitwise(cohort(mlp, data[1:2], partitions=[1]), [TrainedClient(start, 0.0)])


class ListDataset(Dataset):
    """Samples one by one, batched through a DataLoader as a non-tensor dataset is."""

    def __init__(self, tensors: TensorDataset) -> None:
        self.samples = [tensors[i] for i in range(len(tensors))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.samples[index]


def test_any_dataset_trains_as_its_tensor_dataset_does(one_torch_thread) -> None:
    data = datasets((64,))
    as_list: list[Dataset] = [ListDataset(d) for d in data]  # type: ignore[arg-type]
    assert_bitwise(cohort(mlp, as_list), cohort(mlp, data))


@pytest.mark.parametrize(
    ("build", "loss_fn", "reason"),
    [
        (
            lambda: nn.Sequential(nn.Linear(64, 10), nn.BatchNorm1d(10)),
            None,
            "'1' (BatchNorm1d) updates its buffers",
        ),
        (
            lambda: nn.Sequential(nn.Linear(64, 10), nn.Dropout(0.5)),
            None,
            "'1' (Dropout) draws from torch's RNG",
        ),
        (mlp, nn.CrossEntropyLoss(weight=torch.arange(1.0, 11.0)), "per-sample losses"),
    ],
    ids=["batchnorm", "dropout", "weighted-loss"],
)
def test_models_that_cannot_replay_exactly_are_refused_in_one_line(
    build: Callable[[], nn.Module], loss_fn: nn.Module | None, reason: str
) -> None:
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shuffles = generators(range(len(SIZES)))
    states = [g.get_state() for g in shuffles]
    with pytest.raises(ValueError, match=re.escape(reason)) as error:
        train_cohort(
            model,
            datasets((64,)),
            loss_fn=loss_fn or nn.CrossEntropyLoss(),
            lr=LR,
            epochs=EPOCHS,
            batch_size=BATCH,
            generators=shuffles,
        )
    assert "\n" not in str(error.value)
    # The caller falls back to the sequential path: nothing it uses was touched.
    assert all(torch.equal(g.get_state(), s) for g, s in zip(shuffles, states, strict=True))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_dropout_layer_that_draws_nothing_is_accepted(one_torch_thread) -> None:
    data = datasets((64,))

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 10))

    got, want = cohort(build, data), sequential(build, data)
    for have, expected in zip(got, want, strict=True):
        for name, value in expected.state.items():
            torch.testing.assert_close(have.state[name], value, rtol=1e-5, atol=1e-6)


def test_a_step_is_torch_sgds_bit_for_bit_and_an_inactive_client_stays_put() -> None:
    generator = torch.Generator().manual_seed(2)
    start = torch.randn(3, 5, 7, generator=generator)  # 3 clients' (5, 7) parameter
    grads = [torch.randn(3, 5, 7, generator=generator) for _ in range(4)]
    active = [torch.tensor(a) for a in ([1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0])]
    sgd = SGD(0.1, momentum=0.9, weight_decay=1e-2)
    params, momenta = {"w": start.clone()}, None
    for grad, on in zip(grads, active, strict=True):
        params, momenta = sgd.step(params, {"w": grad}, momenta, on.bool())
    for client in range(3):
        weight = nn.Parameter(start[client].clone())
        optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=1e-2)
        for grad, on in zip(grads, active, strict=True):
            if on[client]:
                weight.grad = grad[client].clone()
                optimizer.step()
        assert torch.equal(params["w"][client], weight.detach())
        if client == 2:  # never active: not even its momentum moved it
            assert torch.equal(params["w"][client], start[client])
