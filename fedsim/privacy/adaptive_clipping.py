"""Adaptive clipping: track a quantile of the update norms privately.

Andrew, Thakkar, McMahan & Ramaswamy (2021), "Differentially Private Learning
with Adaptive Clipping", NeurIPS, arXiv:1905.03871. Each client reports
b_i = 1[||update_i|| <= C]; the server averages the bits with Gaussian noise
(std sigma_b) and moves C geometrically towards the target quantile gamma. The
bits cost privacy too, so the updates' noise multiplier is reduced to z_delta,
leaving the pair exactly as private as one Gaussian query with multiplier z.
"""

import math

import numpy as np

TARGET_QUANTILE = 0.5  # gamma: clip at the median norm
LEARNING_RATE = 0.2  # eta_C
INITIAL_CLIP_NORM = 0.1  # C_0
INDICATOR_NOISE_FRACTION = 0.05  # sigma_b = 0.05 * expected cohort size


def indicator_noise_std(expected_cohort_size: float) -> float:
    """Return the paper's default sigma_b, expected cohort size / 20."""
    return INDICATOR_NOISE_FRACTION * expected_cohort_size


def noisy_unclipped_fraction(
    unclipped_count: float,
    *,
    expected_cohort_size: float,
    noise_std: float,
    rng: np.random.Generator,
) -> float:
    """Return b_bar = (sum_i b_i + N(0, sigma_b^2)) / expected cohort size."""
    if not (expected_cohort_size > 0 and noise_std >= 0):
        raise ValueError(
            f"need expected_cohort_size > 0 and noise_std >= 0, got {expected_cohort_size}, "
            f"{noise_std}"
        )
    return float((unclipped_count + rng.normal(0.0, noise_std)) / expected_cohort_size)


def next_clip_norm(
    clip_norm: float,
    *,
    unclipped_fraction: float,
    target_quantile: float = TARGET_QUANTILE,
    learning_rate: float = LEARNING_RATE,
) -> float:
    """Return C * exp(-eta_C (b_bar - gamma)): shrink when too few updates are clipped."""
    return clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


def update_noise_multiplier(noise_multiplier: float, *, indicator_noise_std: float) -> float:
    """Return z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), the multiplier left for the updates.

    The bits, centred to +-1/2, have sensitivity 1/2, so sigma_b is a multiplier
    of 2 sigma_b; two Gaussian queries with multipliers z_delta and 2 sigma_b
    compose like one with z^-2 = z_delta^-2 + (2 sigma_b)^-2 (Andrew et al., Sec. 3.1).
    """
    if not (noise_multiplier > 0 and noise_multiplier < 2 * indicator_noise_std):
        raise ValueError(
            f"need 0 < z < 2 sigma_b for the updates to keep any budget, got z={noise_multiplier}, "
            f"sigma_b={indicator_noise_std}"
        )
    return (noise_multiplier**-2 - (2 * indicator_noise_std) ** -2) ** -0.5
