"""Central DP for federated averaging: Gaussian noise on the sum of clipped updates.

McMahan, Ramage, Talwar & Zhang (2018), "Learning Differentially Private
Recurrent Language Models" (DP-FedAvg), arXiv:1710.06963. Each client's update is
clipped to norm S; N(0, (z S)^2 I) is added to the sum, which is then divided by
the *expected* cohort size: dividing by the realized size would make the
sensitivity of the average depend on who was sampled.

Simulating a cohort of C_s clients for a deployment that samples C_n (Apple's
pfl-research: noise calibrated for 1000, simulated with 50) scales the std on the
sum by C_s / C_n, so the simulated average carries the deployed noise z S / C_n.
"""

import numpy as np

from fedsim.privacy.gaussian import add_gaussian_noise


def average_noise_std(
    *, noise_multiplier: float, clip_norm: float, expected_cohort_size: float
) -> float:
    """Std of the noise on the average: z S / C_bar."""
    if not (noise_multiplier >= 0 and clip_norm > 0 and expected_cohort_size > 0):
        raise ValueError(
            "need noise_multiplier >= 0, clip_norm > 0 and expected_cohort_size > 0, got "
            f"{noise_multiplier}, {clip_norm}, {expected_cohort_size}"
        )
    return noise_multiplier * clip_norm / expected_cohort_size


def noisy_average(
    total: np.ndarray,
    *,
    noise_multiplier: float,
    clip_norm: float,
    expected_cohort_size: float,
    rng: np.random.Generator,
    noise_cohort_size: float | None = None,
) -> np.ndarray:
    """Return (sum of clipped updates + Gaussian noise) / expected cohort size.

    With ``noise_cohort_size`` C_n the noise on the average is z S / C_n, as in a
    deployment sampling C_n clients per round, whatever the simulated cohort:
    the std on the sum is z S * C_bar / C_n. Without it, the noise on the average
    is z S / C_bar.
    """
    noise_cohort = expected_cohort_size if noise_cohort_size is None else noise_cohort_size
    std_on_average = average_noise_std(
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        expected_cohort_size=noise_cohort,
    )
    std_on_sum = std_on_average * expected_cohort_size
    return add_gaussian_noise(total, std=std_on_sum, rng=rng) / expected_cohort_size
