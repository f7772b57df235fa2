"""L2 clipping: the sensitivity bound every DP mechanism here relies on.

DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963) scales each client's update
to norm at most S, so adding or removing one client moves the sum by at most S.
"""

import math

import numpy as np

# Below this norm every square is below float64's smallest normal number: precision is lost.
_SMALLEST_SAFE_NORM = math.sqrt(np.finfo(np.float64).tiny)


def l2_norm(vector: np.ndarray, *, name: str = "vector") -> float:
    """Return the L2 norm of a finite ``vector``, in float64, without overflow or underflow.

    Squaring float32 entries of 1e30 (or float64 ones of 1e200) overflows to inf,
    and clipping by S / inf then returns zeros in silence; squares of entries
    below 1e-154 lose their precision. In either case the norm is recomputed on
    the vector divided by its largest entry, whose squares lie in (0, 1]. A NaN
    or Inf entry, or a norm above the largest float, has no norm to clip to:
    ValueError, naming ``name``.
    """
    values = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(values))
    if _SMALLEST_SAFE_NORM <= norm < math.inf:  # the common case: one pass
        return norm
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite, got NaN or Inf entries")
    scale = float(np.max(np.abs(values), initial=0.0))
    if scale == 0:
        return 0.0
    norm = scale * float(np.linalg.norm(values / scale))
    if norm == math.inf:
        raise ValueError(f"{name} has an L2 norm above the largest float64 (1.8e308)")
    return norm


def clip_l2(vector: np.ndarray, max_norm: float) -> tuple[np.ndarray, float]:
    """Return ``vector`` scaled to L2 norm at most ``max_norm``, and its original norm.

    The original norm is returned because adaptive clipping (Andrew et al. 2021)
    needs whether the update was clipped, and the separated privatizer needs the
    magnitude. The norm is :func:`l2_norm`'s, so a huge but finite vector is
    clipped (not zeroed) and a non-finite one refused.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = l2_norm(vector)
    if norm <= max_norm:
        return vector.copy(), norm
    return vector * (max_norm / norm), norm
