"""ScalarDP: an epsilon-LDP, unbiased randomizer for a magnitude in [0, r_max].

Bhowmick, Duchi, Freudiger, Kapoor & Rogers (2018), "Protection Against
Reconstruction and Its Applications in Private Federated Learning",
arXiv:1812.00984, Algorithm 4 (ScalarDP). The value is randomly rounded to one of
k + 1 levels (unbiased), the level goes through (k+1)-ary randomized response,
and an affine map debiases the response.
"""

import math
import numbers
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ScalarDPParams:
    """ScalarDP's budget ``epsilon``, number of levels ``levels`` (k) and range ``max_value``."""

    epsilon: float
    levels: int
    max_value: float

    def __post_init__(self) -> None:
        # epsilon = inf is allowed: randomized rounding alone, reported as is.
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must lie in (0, inf], got {self.epsilon}")
        # The levels index an array of k + 1 outputs: 2.5 or True would index garbage.
        if not (
            isinstance(self.levels, numbers.Integral)
            and not isinstance(self.levels, bool)
            and self.levels >= 1
        ):
            raise ValueError(f"levels must be an integer >= 1, got {self.levels!r}")
        if not 0 < self.max_value < math.inf:
            raise ValueError(f"max_value must lie in (0, inf), got {self.max_value}")

    @property
    def keep_probability(self) -> float:
        """P(the rounded level is reported as is) = e^eps / (e^eps + k)."""
        return 1 / (1 + self.levels * math.exp(-self.epsilon))  # no overflow for large eps

    @property
    def scale(self) -> float:
        """Debiasing factor a = (e^eps + k) / (e^eps - 1) * r_max / k."""
        k = self.levels
        return (1 + k * math.exp(-self.epsilon)) / -math.expm1(-self.epsilon) * self.max_value / k

    @property
    def offset(self) -> float:
        """Debiasing offset b = k (k + 1) / (2 (e^eps + k)), a uniform response's mean level."""
        return (self.levels + 1) / 2 * (1 - self.keep_probability)  # 1 - keep = k / (e^eps + k)

    def outputs(self) -> np.ndarray:
        """Return the k + 1 values ScalarDP can output, a (j - b) for j = 0..k."""
        return self.scale * (np.arange(self.levels + 1) - self.offset)


def scalar_dp(
    values: npt.ArrayLike, params: ScalarDPParams, rng: np.random.Generator
) -> np.ndarray:
    """Privatize each entry of ``values`` (in [0, r_max]) independently; same shape, float64."""
    values = np.asarray(values, dtype=np.float64)
    outside = ~((values >= 0) & (values <= params.max_value))  # NaN is outside too
    if np.any(outside):
        raise ValueError(f"values must lie in [0, {params.max_value}], got {values[outside][0]}")
    k = params.levels
    # Clip: k * r_max / r_max can round to k + 1 ulp, which must stay level k.
    x = np.minimum(k * values / params.max_value, k)
    level = np.floor(x)
    level += rng.random(values.shape) < x - level  # randomized rounding: E[level] = x
    replaced = rng.random(values.shape) >= params.keep_probability
    shifted = (level + rng.integers(1, k + 1, size=values.shape)) % (k + 1)  # any other level
    reported = np.where(replaced, shifted, level)
    return params.scale * (reported - params.offset)


def scalar_dp_moments(value: float, params: ScalarDPParams) -> tuple[float, float]:
    """Exact mean and variance of ``scalar_dp(value)``, from the distribution of the level.

    P(report j) = P(J = j) * keep + (1 - P(J = j)) * (1 - keep) / k, with J the
    randomly rounded level; the mean is ``value`` (unbiasedness).
    """
    if not 0 <= value <= params.max_value:
        raise ValueError(f"value must lie in [0, {params.max_value}], got {value}")
    k = params.levels
    x = min(k * value / params.max_value, k)
    lower = math.floor(x)
    rounded = np.zeros(k + 1)  # distribution of J
    rounded[lower] = 1 - (x - lower)
    rounded[min(lower + 1, k)] += x - lower
    other = (1 - params.keep_probability) / k
    reported = other + (params.keep_probability - other) * rounded
    outputs = params.outputs()
    mean = float(reported @ outputs)
    return mean, float(reported @ (outputs - mean) ** 2)
