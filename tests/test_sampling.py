"""Seeded cohort sampling: reproducible, distinct, uniform."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from fedsim.engine import InlineGrid
from fedsim.strategies import FedAvg
from fedsim.strategies.sampling import available_nodes, sample_cohort


def _cohort(strategy: FedAvg, grid: InlineGrid, round_: int) -> list[int]:
    messages = strategy.configure_train(round_, ArrayRecord(), ConfigRecord(), grid)
    return [m.metadata.dst_node_id for m in messages]


@pytest.fixture
def grid() -> InlineGrid:
    from flwr.clientapp import ClientApp

    return InlineGrid(ClientApp(), num_nodes=1000)


def test_same_seed_same_cohort_other_round_or_seed_other_cohort(grid: InlineGrid) -> None:
    strategy = FedAvg(seed=7, fraction_train=0.01, min_train_nodes=10)
    first = _cohort(strategy, grid, 1)
    assert first == _cohort(FedAvg(seed=7, fraction_train=0.01, min_train_nodes=10), grid, 1)
    assert first != _cohort(strategy, grid, 2)
    assert first != _cohort(FedAvg(seed=8, fraction_train=0.01, min_train_nodes=10), grid, 1)
    assert len(set(first)) == 10 and set(first) <= set(grid.get_node_ids())


def test_inclusion_frequency_is_uniform_within_five_standard_errors() -> None:
    # Each of n nodes is in a cohort of k with probability p = k/n; over R rounds its
    # count is Binomial(R, p). Check the most extreme node stays within 5 SE.
    n, k, rounds = 50, 5, 4000
    counts = np.zeros(n)
    for round_ in range(rounds):
        rng = np.random.default_rng([3, round_])
        counts[sample_cohort(range(n), k, rng)] += 1
    p = k / n
    se = np.sqrt(rounds * p * (1 - p))
    assert np.max(np.abs(counts - rounds * p)) < 5 * se


def test_sampling_a_million_node_population_touches_only_the_cohort() -> None:
    from flwr.clientapp import ClientApp

    grid = InlineGrid(ClientApp(), num_nodes=1_000_000)
    strategy = FedAvg(seed=0, fraction_train=100 / 1_000_000, min_train_nodes=100)
    assert len(_cohort(strategy, grid, 1)) == 100
    assert grid.nodes.num_with_state == 0  # configuring messages creates no node state


def test_sample_cohort_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="cannot sample 11 nodes from 10"):
        sample_cohort(range(10), 11, np.random.default_rng(0))


def test_a_simulated_population_too_small_for_the_strategy_is_an_error_not_a_wait(
    grid: InlineGrid,
) -> None:
    with pytest.raises(ValueError, match="needs at least 1001 nodes .* population has 1000"):
        available_nodes(grid, 1001)
