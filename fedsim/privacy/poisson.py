"""Poisson cohort sampling: each client joins a round independently with rate q.

Privacy amplification by subsampling, as the accountants compute it for
DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963), assumes this sampling, not a
fixed-size cohort.
"""

from collections.abc import Sequence

import numpy as np

from fedsim.strategies.sampling import sample_cohort


def poisson_cohort(node_ids: Sequence[int], *, rate: float, rng: np.random.Generator) -> list[int]:
    """Return the node ids that joined, in ascending position, each with probability ``rate``.

    Independent Bernoulli(q) draws give a Binomial(K, q) cohort size and, given
    that size, a uniform subset; drawing it that way touches only the sampled ids.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"sampling rate must lie in [0, 1], got {rate}")
    return sample_cohort(node_ids, int(rng.binomial(len(node_ids), rate)), rng)
