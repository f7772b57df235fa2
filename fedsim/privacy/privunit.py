"""PrivUnit2: an epsilon-LDP, unbiased randomizer for unit vectors.

Bhowmick, Duchi, Freudiger, Kapoor & Rogers (2018), "Protection Against
Reconstruction and Its Applications in Private Federated Learning",
arXiv:1812.00984, Algorithm 1 (mechanism), eq. (15) (the scale m) and Theorem 1
(privacy). With probability p the output direction V is uniform on the cap
{v : <v, u> >= gamma}, else uniform on its complement; Z = V / m is unbiased for u
and every output has norm exactly 1/m.

Sampling never rejects: (1 + <V, u>) / 2 ~ Beta(alpha, alpha) with
alpha = (d - 1) / 2 for V uniform on the sphere, so the inner product T is drawn
by the inverse CDF restricted to the cap or its complement, and V = T u +
sqrt(1 - T^2) W with W uniform on the unit sphere of u's orthogonal complement.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import special

from fedsim.privacy.clipping import l2_norm

_SEARCH_ITERATIONS = 100  # each shrinks the interval by 2/3 (ternary) or 1/2 (bisection)
_UNIT_NORM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class PrivUnitParams:
    """PrivUnit2 parameters for one (epsilon, dim), from :func:`calibrate_privunit`.

    Calibration searches gamma with a few hundred incomplete-Beta evaluations, so
    a client computes this once per (epsilon, d) rather than per update.
    """

    dim: int
    epsilon: float  # the total budget: epsilon_cap + epsilon0 <= epsilon
    gamma: float  # cap threshold on <V, u>
    p: float  # probability of sampling the cap, e^epsilon0 / (1 + e^epsilon0)
    inv_m: float  # 1/m, the norm of every output
    epsilon_cap: float
    epsilon0: float

    @property
    def squared_error(self) -> float:
        """E||Z - u||^2 = 1/m^2 - 1 (outputs have norm 1/m and mean u)."""
        return self.inv_m**2 - 1.0


def cap_epsilon(gamma: float, dim: int) -> float:
    """Privacy cost of restricting to the cap at ``gamma`` (Theorem 1 of the paper).

    Bound (16a), log((1 + c) / (1 - c)) with c = gamma sqrt(2(d - 1)/pi), holds
    whenever c < 1; bound (16b), 1/2 log d + log 6 - (d - 1)/2 log(1 - gamma^2)
    + log gamma, holds for gamma >= sqrt(2/d). Either suffices, so the cost is the
    smaller applicable one (they overlap only for d <= 4); ``inf`` if none applies.
    For d = 2, bound (16a) falls below the exact cap cost log(I_tau / (1 - I_tau))
    once gamma > 0.9 (the density of <V, u> grows towards +-1 there), hence d >= 3.
    """
    if not (dim >= 3 and 0 <= gamma < 1):
        raise ValueError(f"need dim >= 3 and 0 <= gamma < 1, got dim={dim}, gamma={gamma}")
    c = gamma * math.sqrt(2 * (dim - 1) / math.pi)
    bound_a = 2 * math.atanh(c) if c < 1 else math.inf  # 2 atanh(c) = log((1+c)/(1-c))
    if gamma < math.sqrt(2 / dim):
        return bound_a
    bound_b = (
        0.5 * math.log(dim)
        + math.log(6)
        - (dim - 1) / 2 * math.log1p(-(gamma**2))
        + math.log(gamma)
    )
    return min(bound_a, bound_b)


def log_inv_m(gamma: float, p: float, dim: int) -> float:
    """Return log(1/m), eq. (15), in log space: 2^(d-2) and B(alpha, alpha) over/underflow.

    1/m = 2^(d-2) (d-1) B(alpha, alpha) / [(1 - gamma^2)^alpha
    (p / (1 - I_tau) - (1 - p) / I_tau)], I_tau the regularized incomplete Beta
    at tau = (1 + gamma)/2; 1 - I_tau is evaluated as I_(1-tau) (symmetry), without
    cancellation.
    """
    alpha, tau = (dim - 1) / 2, (1 + gamma) / 2
    complement_mass = special.betainc(alpha, alpha, tau)  # uniform measure of <v,u> < gamma
    cap_mass = special.betainc(alpha, alpha, 1 - tau)
    if cap_mass == 0:
        raise ValueError(f"gamma={gamma} is too large for dim={dim}: the cap has no mass")
    # log(p / cap_mass - (1 - p) / complement_mass), without overflow for a tiny cap.
    ratio = (1 - p) * cap_mass / (p * complement_mass)
    if not ratio < 1:
        raise ValueError(f"p={p} is too small for gamma={gamma}: the estimator has no scale")
    log_bracket = math.log(p) - math.log(cap_mass) + math.log1p(-ratio)
    return float(
        (dim - 2) * math.log(2)
        + math.log(dim - 1)
        + special.betaln(alpha, alpha)
        - alpha * math.log1p(-(gamma**2))
        - log_bracket
    )


def calibrate_privunit(*, epsilon: float, dim: int, gamma: float | None = None) -> PrivUnitParams:
    """Return PrivUnit2's parameters for budget ``epsilon`` in dimension ``dim``.

    With ``gamma`` None, choose the gamma minimizing 1/m (hence the error
    1/m^2 - 1): the rest of the budget, epsilon0 = epsilon - epsilon_cap(gamma),
    sets p = e^epsilon0 / (1 + e^epsilon0). The cap bound changes form at
    sqrt(2/d), so each side is searched separately (ternary search) and the
    better kept.
    """
    if not (epsilon > 0 and dim >= 3):
        raise ValueError(f"need epsilon > 0 and dim >= 3, got epsilon={epsilon}, dim={dim}")

    def objective(g: float) -> float:
        return log_inv_m(g, float(special.expit(epsilon - cap_epsilon(g, dim))), dim)

    if gamma is None:
        gamma = _optimal_gamma(epsilon, dim, objective)
    epsilon_cap = cap_epsilon(gamma, dim)
    if not epsilon_cap < epsilon:
        raise ValueError(f"gamma={gamma} costs epsilon_cap={epsilon_cap} >= epsilon={epsilon}")
    return PrivUnitParams(
        dim=dim,
        epsilon=epsilon,
        gamma=gamma,
        p=float(special.expit(epsilon - epsilon_cap)),
        inv_m=math.exp(objective(gamma)),
        epsilon_cap=epsilon_cap,
        epsilon0=epsilon - epsilon_cap,
    )


def _optimal_gamma(epsilon: float, dim: int, objective: Callable[[float], float]) -> float:
    """Minimize ``objective`` over the gammas whose cap cost stays below ``epsilon``."""
    threshold = math.sqrt(2 / dim)
    # Below sqrt(2/d) only bound (16a) applies; it reaches epsilon where c = tanh(epsilon/2).
    top_a = math.tanh(epsilon / 2) * math.sqrt(math.pi / (2 * (dim - 1)))
    candidates = [_ternary(objective, 0.0, min(threshold, top_a))]
    if cap_epsilon(threshold, dim) < epsilon:
        top_b = _last_true(lambda g: cap_epsilon(g, dim) < epsilon, threshold, 1.0)
        candidates.append(_ternary(objective, threshold, top_b))
    return min(candidates, key=objective)


def _ternary(f: Callable[[float], float], lo: float, hi: float) -> float:
    """Return the minimizer of a unimodal ``f`` on [lo, hi], never evaluating an end."""
    for _ in range(_SEARCH_ITERATIONS):
        left, right = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if f(left) < f(right):
            hi = right
        else:
            lo = left
    return (lo + hi) / 2


def _last_true(predicate: Callable[[float], bool], lo: float, hi: float) -> float:
    """Bisect for the largest x in [lo, hi) with ``predicate(x)``; it must hold at lo."""
    for _ in range(_SEARCH_ITERATIONS):
        mid = (lo + hi) / 2
        if not lo < mid < hi:  # lo and hi are adjacent floats
            break
        lo, hi = (mid, hi) if predicate(mid) else (lo, mid)
    return lo


def sample_privunit(
    u: np.ndarray, params: PrivUnitParams, rng: np.random.Generator, num_draws: int
) -> np.ndarray:
    """Return ``num_draws`` independent PrivUnit2 outputs for unit vector ``u``, shape (n, d).

    Memory is about three (n, d) float64 arrays: draw large samples in batches.
    """
    u = _unit_vector(u, params.dim)
    t = _sample_inner_products(params, rng, num_draws)  # (n,) = <V, u>
    w = rng.standard_normal((num_draws, params.dim))  # (n, d)
    w -= np.outer(w @ u, u)  # project onto u's orthogonal complement
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    v = t[:, None] * u + np.sqrt(1 - t**2)[:, None] * w  # (n, d), unit rows
    return v * params.inv_m


def privunit(u: np.ndarray, params: PrivUnitParams, rng: np.random.Generator) -> np.ndarray:
    """Return one PrivUnit2 output for unit vector ``u``: norm 1/m, mean ``u``."""
    return sample_privunit(u, params, rng, 1)[0]


def _sample_inner_products(
    params: PrivUnitParams, rng: np.random.Generator, num_draws: int
) -> np.ndarray:
    """Draw T = <V, u>: from the cap [gamma, 1] with probability p, else from [-1, gamma).

    S = (1 + T)/2 is Beta(alpha, alpha) truncated to [tau, 1] or [0, tau), drawn by
    the inverse CDF; the cap uses 1 - S, truncated to [0, 1 - tau], so that a cap
    of tiny mass keeps full precision.
    """
    alpha, tau = (params.dim - 1) / 2, (1 + params.gamma) / 2
    in_cap = rng.random(num_draws) < params.p
    uniform = rng.random(num_draws)
    t = np.empty(num_draws)
    cap_mass = special.betainc(alpha, alpha, 1 - tau)
    t[in_cap] = 1 - 2 * special.betaincinv(alpha, alpha, uniform[in_cap] * cap_mass)
    complement_mass = special.betainc(alpha, alpha, tau)
    t[~in_cap] = 2 * special.betaincinv(alpha, alpha, uniform[~in_cap] * complement_mass) - 1
    return t


def _unit_vector(u: np.ndarray, dim: int) -> np.ndarray:
    """Check ``u`` is a finite unit vector of R^dim and renormalize it to full precision."""
    norm = l2_norm(u, name="u")
    if u.shape != (dim,) or not abs(norm - 1) <= _UNIT_NORM_TOLERANCE:
        raise ValueError(
            f"expected a unit vector of shape ({dim},), got shape {u.shape}, norm {norm}"
        )
    return np.asarray(u, dtype=np.float64) / norm
