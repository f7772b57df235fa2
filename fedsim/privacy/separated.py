"""Separated local privatization: privatize an update's direction and magnitude apart.

Bhowmick, Duchi, Freudiger, Kapoor & Rogers (2018), "Protection Against
Reconstruction and Its Applications in Private Federated Learning",
arXiv:1812.00984, Section 4.2. A direction in R^d needs far more budget than one
scalar, so the two get separate budgets: the client clips its update to r_max,
sends R_hat * Z with Z = PrivUnit2(direction; eps1) and R_hat = ScalarDP(norm; eps2),
and is (eps1 + eps2)-LDP by composition. Z and R_hat are independent and
unbiased, so E[R_hat * Z] = clip(update) and a plain server mean is unbiased.
"""

import numpy as np

from fedsim.privacy.clipping import l2_norm
from fedsim.privacy.privunit import PrivUnitParams, privunit
from fedsim.privacy.scalar_dp import ScalarDPParams, scalar_dp


def privatize_separated(
    update: np.ndarray,
    *,
    direction: PrivUnitParams,
    magnitude: ScalarDPParams,
    rng: np.random.Generator,
) -> np.ndarray:
    """Return R_hat * Z for a flat ``update``; ``magnitude.max_value`` is the clip radius.

    A zero update has no direction: a uniformly random one is privatized instead,
    so the output is still a PrivUnit2 output times a ScalarDP output (the LDP
    guarantee holds for every input), and E[R_hat] = 0 at r = 0 keeps it unbiased.
    An update with a NaN or Inf entry is refused (ValueError), never privatized
    into noise around garbage; a huge but finite one is clipped, its norm taken
    without overflow (:func:`~fedsim.privacy.clipping.l2_norm`).
    """
    norm = l2_norm(update, name="update")
    if norm > 0:
        unit = update / norm
    else:
        gaussian = rng.standard_normal(direction.dim)
        unit = gaussian / np.linalg.norm(gaussian)
    radius = min(norm, magnitude.max_value)
    return scalar_dp(radius, magnitude, rng) * privunit(unit, direction, rng)
