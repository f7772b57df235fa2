"""The Gaussian mechanism: add N(0, std^2 I) to a vector.

Dwork & Roth (2014), "The Algorithmic Foundations of Differential Privacy",
Section 3.5.3. The privacy it buys depends on std relative to the sensitivity
and on composition; :mod:`fedsim.privacy.accounting` computes that.
"""

import numpy as np


def add_gaussian_noise(vector: np.ndarray, *, std: float, rng: np.random.Generator) -> np.ndarray:
    """Return ``vector + N(0, std^2 I)`` (float64), drawing from ``rng`` only."""
    if not std >= 0:
        raise ValueError(f"noise std must be non-negative, got {std}")
    return vector + rng.normal(0.0, std, size=np.shape(vector))
