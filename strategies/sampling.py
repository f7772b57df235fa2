"""Seeded cohort sampling (fixed-size or Poisson) that never lists the whole population."""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import MessageType
from flwr.serverapp import Grid

from fedsim.seeding import SERVER_NODE, numpy_rng

logger = logging.getLogger(__name__)


def available_nodes(grid: Grid, minimum: int, *, poll_s: float = 1.0) -> Sequence[int]:
    """Return the grid's node ids once at least ``minimum`` are connected.

    Simulation engines return a ``range`` (no copy, whatever the population), and
    that population never grows, so too few nodes there is an error, not a wait;
    under Flower's deployment runtime nodes connect over time, so we wait for them
    as Flower's own strategies do.
    """
    while True:
        node_ids = grid.get_node_ids()
        if not isinstance(node_ids, Sequence):
            node_ids = list(node_ids)
        if len(node_ids) >= minimum:
            return node_ids
        if isinstance(node_ids, range):
            raise ValueError(
                f"the strategy needs at least {minimum} nodes (min_*_nodes, "
                f"min_available_nodes) but the simulated population has {len(node_ids)}"
            )
        logger.info("Waiting for nodes: %d connected, %d needed", len(node_ids), minimum)
        time.sleep(poll_s)


def sample_cohort(node_ids: Sequence[int], size: int, rng: np.random.Generator) -> list[int]:
    """Draw ``size`` distinct node ids uniformly, in ascending order.

    ``Generator.choice`` without replacement uses Floyd's algorithm on large
    populations, so drawing 100 of 10**6 touches 100 ids, not 10**6.
    """
    if not 0 <= size <= len(node_ids):
        raise ValueError(f"cannot sample {size} nodes from {len(node_ids)}")
    positions = np.sort(rng.choice(len(node_ids), size=size, replace=False))
    return [node_ids[int(p)] for p in positions]


def poisson_cohort(node_ids: Sequence[int], *, rate: float, rng: np.random.Generator) -> list[int]:
    """Return the node ids that joined, in ascending position, each with probability ``rate``.

    Privacy amplification by subsampling, as the accountants compute it for
    DP-FedAvg (McMahan et al. 2018), assumes this sampling, not a fixed-size
    cohort. Independent Bernoulli(q) draws give a Binomial(K, q) cohort size and,
    given that size, a uniform subset; drawing it that way touches only the
    sampled ids.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"sampling rate must lie in [0, 1], got {rate}")
    return sample_cohort(node_ids, int(rng.binomial(len(node_ids), rate)), rng)


@dataclass(frozen=True, kw_only=True)
class CohortSampler:
    """A round's training and evaluation cohorts, drawn from ``(seed, round)`` alone.

    Flower's strategies draw cohorts from the global ``random`` module; this draws
    from a generator seeded by the run's seed and the round, so a run replays
    exactly and any round can be reproduced in isolation. The sizes follow
    Flower's rule: ``max(int(fraction * population), minimum)``, capped at the
    population.
    """

    seed: int = 0
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    fraction_evaluate: float = 1.0
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2

    def __post_init__(self) -> None:
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def sample(self, server_round: int, grid: Grid, *, train: bool) -> list[int]:
        """Return the round's training (or evaluation) cohort, in ascending node order."""
        fraction = self.fraction_train if train else self.fraction_evaluate
        minimum = self.min_train_nodes if train else self.min_evaluate_nodes
        if fraction == 0.0:
            return []
        node_ids = available_nodes(grid, max(self.min_available_nodes, minimum))
        size = min(max(int(len(node_ids) * fraction), minimum), len(node_ids))
        purpose = f"sample-{MessageType.TRAIN if train else MessageType.EVALUATE}"
        cohort = sample_cohort(
            node_ids, size, numpy_rng(self.seed, server_round, SERVER_NODE, purpose)
        )
        logger.debug("%s: sampled %d of %d nodes", purpose, len(cohort), len(node_ids))
        return cohort
