"""Field quantization for secure aggregation: a weighted update as integers mod 2^32.

Masks are uniform on Z_M with M = 2^32, so what they hide must be integers mod M
as well (Bonawitz et al. 2017, §3). A client

1. clips every coordinate of its update Δ to [-c, c] (c = ``clip_range``);
2. scales it to x = Δ·L/c in [-L, L] (L = ``levels``) and rounds stochastically:
   q = ⌊x⌋ + Bernoulli(x - ⌊x⌋), so E[q] = x and |q - x| < 1;
3. multiplies q by its integer weight w ≤ W (its example count, capped at
   ``max_weight``) and appends w, so the server can form a weighted mean from the
   sum alone: (w·q mod M, ..., w).

With L = ⌊(2^31 - 1) / (W·n)⌋ for n clients, |Σ w·q| ≤ 2^31 - 1: the sum never
wraps, and reading it as a signed 32-bit integer gives Σ w·q exactly.

Error bound: where no coordinate was clipped, the decoded mean (c/L)·Σ w q / Σ w
differs from the exact weighted mean Σ w Δ / Σ w by less than c/L in every
coordinate (a weighted mean of rounding errors each below one level), and is
unbiased.

Under central DP every client has weight 1 (W = 1) and clips its update in L2
norm (:meth:`FieldQuantizer.safe_l2_radius`) with c = S, so no coordinate is
range-clipped; the server decodes the sum (:meth:`FieldQuantizer.decode_sum`),
whose error is below n·c/L per coordinate for n contributions.
"""

from dataclasses import dataclass

import numpy as np

MODULUS = 2**32
_SIGNED_MAX = 2**31 - 1


def levels_for(num_clients: int, max_weight: int) -> int:
    """Return the largest L for which the sum of ``num_clients`` inputs cannot wrap."""
    if num_clients < 1 or max_weight < 1:
        raise ValueError(f"need num_clients, max_weight >= 1, got {num_clients}, {max_weight}")
    levels = _SIGNED_MAX // (num_clients * max_weight)
    if levels < 1:
        raise ValueError(
            f"{num_clients} clients of weight up to {max_weight} overflow 32-bit sums; "
            "lower max_weight"
        )
    return levels


def stochastic_round(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round each entry down or up, up with probability equal to its fractional part."""
    floor = np.floor(values)
    return (floor + (rng.random(values.shape) < values - floor)).astype(np.int64)


@dataclass(frozen=True)
class FieldQuantizer:
    """The encoding server and clients agree on for one round.

    Parameters
    ----------
    clip_range
        c: each coordinate of an update is clipped to [-c, c].
    levels
        L: the quantization step is c/L (see :func:`levels_for`).
    max_weight
        W: a client's weight is its example count, capped at W.
    """

    clip_range: float
    levels: int
    max_weight: int

    def __post_init__(self) -> None:
        if not self.clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")
        if self.levels < 1 or self.max_weight < 1 or self.levels * self.max_weight > _SIGNED_MAX:
            raise ValueError(
                f"need levels, max_weight >= 1 with a product below 2^31, "
                f"got {self.levels}, {self.max_weight}"
            )

    @property
    def error_bound(self) -> float:
        """Bound on the error of each coordinate of the decoded mean: c/L."""
        return self.clip_range / self.levels

    def encode(self, update: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        """Return ``(w·q mod 2^32, ..., w)`` as uint32, d + 1 entries, w = min(weight, W)."""
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        w = min(weight, self.max_weight)
        scaled = np.clip(update, -self.clip_range, self.clip_range) * (
            self.levels / self.clip_range
        )
        weighted = np.append(stochastic_round(scaled, rng) * w, w)
        return np.mod(weighted, MODULUS).astype(np.uint32)

    def safe_l2_radius(self, norm_bound: float, dim: int) -> float:
        """Return the L2 radius r that keeps a decoded contribution within ``norm_bound``.

        Stochastic rounding moves each of the d coordinates by less than c/L, so a
        vector by less than √d·c/L: an update clipped to r = S - √d·c/L decodes to
        norm below S, so a sum of such contributions has sensitivity S exactly, as
        central DP's noise assumes. With S ≤ c no coordinate is range-clipped.
        """
        if not norm_bound > 0:
            raise ValueError(f"the norm bound must be positive, got {norm_bound}")
        radius = norm_bound - np.sqrt(dim) * self.error_bound
        if radius <= 0:
            raise ValueError(
                f"{dim} coordinates at {self.levels} levels can round past norm {norm_bound}"
            )
        return float(radius)

    def decode_sum(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """Return the sum of the weighted updates and the total weight from an unmasked sum."""
        signed = np.ascontiguousarray(total[:-1], dtype=np.uint32).view(np.int32)
        return signed.astype(np.float64) * self.error_bound, int(total[-1])

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """Return the weighted mean update and the total weight from an unmasked sum.

        Raises ``ValueError`` if the total weight is zero (no client had data).
        """
        weighted_sum, weight = self.decode_sum(total)
        if weight == 0:
            raise ValueError("the total weight is zero")
        return weighted_sum / weight, weight
