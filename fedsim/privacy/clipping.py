"""L2 clipping: the sensitivity bound every DP mechanism here relies on.

DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963) scales each client's update
to norm at most S, so adding or removing one client moves the sum by at most S.
"""

import numpy as np


def clip_l2(vector: np.ndarray, max_norm: float) -> tuple[np.ndarray, float]:
    """Return ``vector`` scaled to L2 norm at most ``max_norm``, and its original norm.

    The original norm is returned because adaptive clipping (Andrew et al. 2021)
    needs whether the update was clipped, and the separated privatizer needs the
    magnitude.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = float(np.linalg.norm(vector))
    if norm <= max_norm:
        return vector.copy(), norm
    return vector * (max_norm / norm), norm
