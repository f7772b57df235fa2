"""The DP trainer's gradient queries: exact without noise, clipped, noised as stated, accounted.

Bounds are k standard errors of the quantity tested (k = 5) with fixed seeds.
"""

import math

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant
from torch import nn

from fedsim import keys
from fedsim.clients.dp_sgd import DPSGD
from fedsim.clients.local_routines import LocalData, batch_gradient, gradient_difference
from fedsim.clients.trainer import DPTrainer

N, FEATURES = 64, 5


def _setup(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor], LocalData]:
    torch.manual_seed(seed)
    model = nn.Linear(FEATURES, 3)
    point = {name: value.detach().clone() for name, value in model.named_parameters()}
    data = LocalData(torch.randn(N, FEATURES) * 10, torch.randint(0, 3, (N,)))
    return model, point, data


def _trainer(sigma: float, clip: float, seed: int = 0) -> DPTrainer:
    settings = DPSGD(noise_multiplier=sigma, max_grad_norm=clip)
    return DPTrainer(
        settings,
        noise=torch.Generator().manual_seed(seed),
        epochs=torch.Generator().manual_seed(seed + 1),
    )


def _flat(point: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.flatten() for value in point.values()])


def test_without_noise_or_clipping_a_full_batch_query_is_the_exact_gradient() -> None:
    model, point, data = _setup()
    trainer = _trainer(sigma=0.0, clip=1e9)
    batch = trainer.batch(data, 0, torch.Generator().manual_seed(0))  # size 0: all, q = 1
    private, loss = trainer.gradient(model, nn.CrossEntropyLoss(), point, batch)
    exact, exact_loss = batch_gradient(model, nn.CrossEntropyLoss(), point, batch)
    torch.testing.assert_close(_flat(private), _flat(exact), rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(exact_loss)
    previous = {name: value + 0.1 for name, value in point.items()}
    private, _ = trainer.difference(model, nn.CrossEntropyLoss(), point, previous, batch)
    exact, _ = gradient_difference(model, nn.CrossEntropyLoss(), point, previous, batch)
    torch.testing.assert_close(_flat(private), _flat(exact), rtol=1e-5, atol=1e-6)


def test_each_sample_counts_for_at_most_the_clip_norm() -> None:
    model, point, data = _setup()
    clip = 0.01  # far below these samples' gradient norms (inputs of scale 10)
    trainer = _trainer(sigma=0.0, clip=clip)
    batch = trainer.batch(data, 0, torch.Generator().manual_seed(0))
    private, _ = trainer.gradient(model, nn.CrossEntropyLoss(), point, batch)
    # Mean of N vectors of norm exactly C (all are clipped): at most C, and exactly C for one.
    assert _flat(private).norm() <= clip * (1 + 1e-5)
    one = (data.inputs[:1], data.targets[:1])
    trainer = _trainer(sigma=0.0, clip=clip)
    trainer.batch(LocalData(*one), 0, torch.Generator())
    single, _ = trainer.gradient(model, nn.CrossEntropyLoss(), point, one)
    assert _flat(single).norm().item() == pytest.approx(clip, rel=1e-5)


def test_the_noise_has_std_sigma_clip_over_the_expected_batch() -> None:
    model = nn.Linear(100, 100)  # 10,100 coordinates, whose loss below has zero gradient
    point = {name: value.detach().clone() for name, value in model.named_parameters()}
    data = LocalData(torch.randn(N, 100), torch.zeros(N))
    sigma, clip, size = 1.3, 0.5, 16
    trainer = _trainer(sigma, clip, seed=3)
    batch = trainer.batch(data, size, torch.Generator().manual_seed(3))
    noisy, _ = trainer.gradient(model, lambda out, _y: 0.0 * out.sum(), point, batch)
    values = _flat(noisy).double().numpy()
    expected_std = sigma * clip / size  # q n = size: the expected batch
    count = values.size
    assert abs(values.mean()) < 5 * expected_std / math.sqrt(count)
    assert abs(values.std() - expected_std) < 5 * expected_std / math.sqrt(2 * count)


def test_batches_are_poisson_at_rate_size_over_n() -> None:
    data = LocalData(torch.randn(N, 2), torch.zeros(N))
    trainer, generator = _trainer(1.0, 1.0), torch.Generator().manual_seed(5)
    size, draws = 16, 2000
    counts = np.array([len(trainer.batch(data, size, generator)[1]) for _ in range(draws)])
    q = size / N
    standard_error = math.sqrt(N * q * (1 - q) / draws)
    assert abs(counts.mean() - size) < 5 * standard_error
    assert counts.min() < size < counts.max()  # the size varies: not a fixed-size draw


def test_the_same_generators_give_the_same_query_and_others_do_not() -> None:
    model, point, data = _setup()

    def query(seed: int) -> torch.Tensor:
        trainer = _trainer(1.0, 1.0, seed=seed)
        batch = trainer.batch(data, 16, torch.Generator().manual_seed(seed))
        return _flat(trainer.gradient(model, nn.CrossEntropyLoss(), point, batch)[0])

    assert torch.equal(query(1), query(1)) and not torch.equal(query(1), query(2))


def test_every_query_is_one_subsampled_gaussian_step_in_the_nodes_accountant() -> None:
    model, point, data = _setup()
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    sigma, size, queries = 1.1, 16, 7
    for round_ in range(2):  # the accountant lives in Context.state across messages
        trainer = _trainer(sigma, 1.0, seed=round_)
        generator = torch.Generator().manual_seed(round_)
        for _ in range(queries):
            batch = trainer.batch(data, size, generator)
            trainer.gradient(model, nn.CrossEntropyLoss(), point, batch)
        reported = trainer.spend(context)[keys.DP_EPSILON]
    expected = RDPAccountant()
    expected.history = [(sigma, size / N, queries), (sigma, size / N, queries)]
    assert reported == pytest.approx(expected.get_epsilon(delta=1e-5), rel=1e-12)
