"""Privacy mechanisms: reference values from the papers, and statistical tests bounded by theory.

Statistical bounds are k = 5 standard errors (or the DKW bound with the same
two-sided tail, 5.7e-7) with fixed seeds.
"""

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import special

from fedsim.privacy.adaptive_clipping import (
    indicator_noise_std,
    next_clip_norm,
    noisy_unclipped_fraction,
    update_noise_multiplier,
)
from fedsim.privacy.central import average_noise_std, noisy_average
from fedsim.privacy.clipping import clip_l2
from fedsim.privacy.flat import flatten, unflatten
from fedsim.privacy.gaussian import add_gaussian_noise
from fedsim.privacy.privunit import (
    PrivUnitParams,
    calibrate_privunit,
    cap_epsilon,
    log_inv_m,
    privunit,
    sample_privunit,
)
from fedsim.privacy.scalar_dp import ScalarDPParams, scalar_dp, scalar_dp_moments
from fedsim.privacy.separated import privatize_separated
from fedsim.strategies.sampling import poisson_cohort

K = 5  # standard errors
DKW_TAIL = 2 * special.ndtr(-K)  # the two-sided tail of K standard errors


def dkw_bound(n: int) -> float:
    """sup |F_n - F| exceeds this with probability at most DKW_TAIL (Massart's DKW)."""
    return math.sqrt(math.log(2 / DKW_TAIL) / (2 * n))


def ks_distance(samples: np.ndarray, cdf: Callable[[np.ndarray], np.ndarray]) -> float:
    x = np.sort(samples)
    f = cdf(x)
    n = len(x)
    return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))


def sign_unit(dim: int, seed: int) -> np.ndarray:
    # Every |u_i| = 1/sqrt(d): then Var(Z_i) = (1/m^2 - 1)/d exactly for every coordinate.
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=dim) / math.sqrt(dim)


# --- flattening and clipping ---------------------------------------------------------


def test_flatten_then_unflatten_restores_names_shapes_dtypes_and_values() -> None:
    arrays = {
        "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "conv.bias": np.array([1.5, -2.0], dtype=np.float64),
        "scale": np.array(3.0, dtype=np.float32),
    }
    vector, layout = flatten(arrays)
    assert vector.dtype == np.float64 and vector.shape == (27,) and layout.size == 27
    np.testing.assert_array_equal(vector[24:], [1.5, -2.0, 3.0])
    restored = unflatten(vector, layout)
    assert list(restored) == list(arrays)
    for name, value in arrays.items():
        assert restored[name].dtype == value.dtype and restored[name].shape == value.shape
        np.testing.assert_array_equal(restored[name], value)
    with pytest.raises(ValueError, match="length 27"):
        unflatten(vector[:-1], layout)


def test_clip_l2_scales_long_vectors_to_the_bound_and_keeps_short_ones() -> None:
    clipped, norm = clip_l2(np.array([3.0, 4.0]), 1.0)
    np.testing.assert_allclose(clipped, [0.6, 0.8])
    assert norm == 5.0
    short = np.array([0.3, 0.4])
    kept, norm = clip_l2(short, 1.0)
    np.testing.assert_array_equal(kept, short)
    assert norm == pytest.approx(0.5) and kept is not short
    with pytest.raises(ValueError, match="max_norm must be positive"):
        clip_l2(short, 0.0)


def test_every_clipped_contribution_is_within_the_bound() -> None:
    rng = np.random.default_rng(0)
    scales = rng.lognormal(0.0, 2.0, size=2000)
    for scale in scales:
        clipped, _ = clip_l2(scale * rng.standard_normal(50), 0.4)
        assert np.linalg.norm(clipped) <= 0.4 + 1e-6


# --- Gaussian mechanism and central DP -----------------------------------------------


def test_gaussian_noise_has_zero_mean_and_the_requested_variance() -> None:
    n, std = 10**6, 0.7
    noise = add_gaussian_noise(np.zeros(n), std=std, rng=np.random.default_rng(1))
    assert abs(noise.mean()) < K * std / math.sqrt(n)
    # Var of the sample variance of a Gaussian is 2 std^4 / n.
    assert abs(noise.var() - std**2) < K * std**2 * math.sqrt(2 / n)
    with pytest.raises(ValueError, match="non-negative"):
        add_gaussian_noise(np.zeros(3), std=-1.0, rng=np.random.default_rng(0))


def test_average_noise_std_is_z_s_over_the_expected_cohort() -> None:
    assert average_noise_std(
        noise_multiplier=1.1, clip_norm=0.4, expected_cohort_size=1000
    ) == pytest.approx(4.4e-4)


@pytest.mark.parametrize("noise_cohort_size", [None, 1000.0])
def test_noisy_average_of_zero_updates_has_std_z_s_over_the_cohort(
    noise_cohort_size: float | None,
) -> None:
    # Apple's pfl-research recipe: S = 0.4, simulate 50 clients, calibrate noise for 1000.
    z, s, simulated = 1.2, 0.4, 50.0
    average = noisy_average(
        np.zeros(10**6),
        noise_multiplier=z,
        clip_norm=s,
        expected_cohort_size=simulated,
        rng=np.random.default_rng(2),
        noise_cohort_size=noise_cohort_size,
    )
    expected = z * s / (noise_cohort_size or simulated)
    assert average.std() == pytest.approx(expected, rel=0.01)


def test_poisson_cohort_size_and_inclusion_match_the_rate() -> None:
    population, rate, rounds = 1000, 0.05, 2000
    rng = np.random.default_rng(3)
    sizes, counts = np.zeros(rounds), np.zeros(population)
    for round_ in range(rounds):
        cohort = poisson_cohort(range(population), rate=rate, rng=rng)
        sizes[round_] = len(cohort)
        counts[cohort] += 1
        assert len(set(cohort)) == len(cohort)
    mean = rate * population
    assert abs(sizes.mean() - mean) < K * math.sqrt(mean * (1 - rate) / rounds)
    assert sizes.var() == pytest.approx(mean * (1 - rate), rel=K * math.sqrt(2 / rounds))
    # Each node's count is Binomial(rounds, rate).
    se = math.sqrt(rounds * rate * (1 - rate))
    assert np.max(np.abs(counts - rounds * rate)) < K * se


# --- adaptive clipping -----------------------------------------------------------------


def test_adaptive_clipping_reference_values() -> None:
    clip = 0.1
    rng = np.random.default_rng(0)
    none_clipped = noisy_unclipped_fraction(100, expected_cohort_size=100, noise_std=0.0, rng=rng)
    all_clipped = noisy_unclipped_fraction(0, expected_cohort_size=100, noise_std=0.0, rng=rng)
    assert next_clip_norm(clip, unclipped_fraction=none_clipped) == pytest.approx(
        clip * 0.904837, rel=1e-6
    )
    assert next_clip_norm(clip, unclipped_fraction=all_clipped) == pytest.approx(
        clip * 1.105171, rel=1e-6
    )
    assert indicator_noise_std(100) == pytest.approx(5.0)
    assert update_noise_multiplier(1.0, indicator_noise_std=5.0) == pytest.approx(
        1.0050378, abs=1e-7
    )


@pytest.mark.parametrize("z", [10.0, 12.0])
def test_update_noise_multiplier_rejects_z_at_least_twice_sigma_b(z: float) -> None:
    with pytest.raises(ValueError, match="0 < z < 2 sigma_b"):
        update_noise_multiplier(z, indicator_noise_std=5.0)


def test_noisy_unclipped_fraction_has_the_indicator_noise() -> None:
    rng, n, m, sigma_b = np.random.default_rng(4), 10**5, 100, 5.0
    draws = np.array(
        [
            noisy_unclipped_fraction(37, expected_cohort_size=m, noise_std=sigma_b, rng=rng)
            for _ in range(n)
        ]
    )
    std = sigma_b / m
    assert abs(draws.mean() - 0.37) < K * std / math.sqrt(n)
    assert abs(draws.std() - std) < K * std / math.sqrt(2 * n)


def test_noise_free_adaptive_clipping_converges_to_the_target_quantile() -> None:
    norms = np.random.default_rng(5).lognormal(0.0, 1.0, size=1001)  # median 1.0 or so
    clip = 0.1
    for _ in range(300):
        fraction = float(np.mean(norms <= clip))
        clip = next_clip_norm(clip, unclipped_fraction=fraction, target_quantile=0.5)
    # One step moves C by at most a factor e^0.1; the median of 1001 norms is exact.
    median = float(np.median(norms))
    assert median * math.exp(-0.1) <= clip <= median * math.exp(0.1)


# --- PrivUnit2 ---------------------------------------------------------------------------

PRIVUNIT_TABLE = [(6, 100, 26.98), (1, 1000, 6479.6), (2, 1000, 1774.1)]
PRIVUNIT_TABLE += [(4, 1000, 615.0), (7, 1000, 198.95), (10, 1000, 107.05)]


@pytest.mark.parametrize(("epsilon", "dim", "inv_m_squared"), PRIVUNIT_TABLE)
def test_privunit_optimal_gamma_reference_values(
    epsilon: float, dim: int, inv_m_squared: float
) -> None:
    params = calibrate_privunit(epsilon=epsilon, dim=dim)
    assert params.inv_m**2 == pytest.approx(inv_m_squared, rel=0.005)
    assert params.epsilon_cap + params.epsilon0 <= epsilon + 1e-12
    assert params.p == pytest.approx(math.exp(params.epsilon0) / (1 + math.exp(params.epsilon0)))


def test_privunit_fixed_gamma_reference_values() -> None:
    params = calibrate_privunit(epsilon=8, dim=1000, gamma=0.01)
    assert params.epsilon_cap == pytest.approx(0.515494, abs=1e-6)
    assert params.p == pytest.approx(0.999438595, abs=1e-9)
    assert params.inv_m == pytest.approx(31.3514, abs=1e-4)
    with pytest.raises(ValueError, match="epsilon_cap"):
        calibrate_privunit(epsilon=0.5, dim=1000, gamma=0.01)


@pytest.mark.parametrize("dim", [3, 4, 5, 10, 100, 1000])
@pytest.mark.parametrize("epsilon", [0.5, 1.0, 4.0, 8.0, 16.0])
def test_privunit_true_privacy_loss_is_within_budget(epsilon: float, dim: int) -> None:
    # Output densities are p/A_cap on the cap and (1-p)/A_complement off it, so the
    # exact pure-LDP loss is epsilon0 + log(A_complement / A_cap): the paper's
    # epsilon_cap must bound log(A_complement / A_cap).
    params = calibrate_privunit(epsilon=epsilon, dim=dim)
    alpha, tau = (dim - 1) / 2, (1 + params.gamma) / 2
    area_ratio = special.betainc(alpha, alpha, tau) / special.betainc(alpha, alpha, 1 - tau)
    assert params.epsilon0 + math.log(area_ratio) <= epsilon + 1e-9


@pytest.mark.parametrize(("epsilon", "dim"), [(1.0, 10), (4.0, 100), (7.0, 1000)])
def test_privunit_search_finds_the_grid_minimum_of_1_over_m(epsilon: float, dim: int) -> None:
    # Slow reference for the ternary search: every feasible gamma on a fine grid.
    params = calibrate_privunit(epsilon=epsilon, dim=dim)
    grid = np.linspace(0.0, 1.0, 20001)[:-1]
    feasible = [g for g in grid if cap_epsilon(float(g), dim) < epsilon]
    best = min(
        log_inv_m(float(g), float(special.expit(epsilon - cap_epsilon(float(g), dim))), dim)
        for g in feasible
    )
    assert math.log(params.inv_m) <= best + 1e-9


@pytest.mark.parametrize(("gamma", "p", "dim"), [(0.1, 0.9, 50), (0.3, 0.6, 10), (0.0, 0.8, 200)])
def test_log_inv_m_matches_the_direct_formula(gamma: float, p: float, dim: int) -> None:
    # Slow reference: eq. (15) with the non-regularized incomplete Beta, in linear space.
    alpha, tau = (dim - 1) / 2, (1 + gamma) / 2
    beta = special.beta(alpha, alpha)
    incomplete = special.betainc(alpha, alpha, tau) * beta
    m = ((1 - gamma**2) ** alpha) * (p / (beta - incomplete) - (1 - p) / incomplete)
    m /= 2 ** (dim - 2) * (dim - 1)
    assert log_inv_m(gamma, p, dim) == pytest.approx(-math.log(m), rel=1e-10)


def test_cap_epsilon_uses_each_bound_on_its_side() -> None:
    d = 1000
    c = 0.01 * math.sqrt(2 * (d - 1) / math.pi)
    assert cap_epsilon(0.01, d) == pytest.approx(math.log((1 + c) / (1 - c)), rel=1e-12)
    gamma = 0.1
    side_b = 0.5 * math.log(d) + math.log(6) - (d - 1) / 2 * math.log(1 - gamma**2)
    assert cap_epsilon(gamma, d) == pytest.approx(side_b + math.log(gamma), rel=1e-12)
    with pytest.raises(ValueError, match="dim >= 3"):
        cap_epsilon(0.1, 2)


def _privunit_draws(params: PrivUnitParams, u: np.ndarray, n: int, seed: int) -> dict:
    """Sum, squared errors, inner products <V, u> and norm errors of n draws, in batches."""
    rng = np.random.default_rng(seed)
    batch = max(1, 2 * 10**6 // params.dim)  # about 16 MB per (batch, d) array
    total, squared_error, inner, worst_norm = np.zeros(params.dim), 0.0, [], 0.0
    for start in range(0, n, batch):
        z = sample_privunit(u, params, rng, min(batch, n - start))  # (batch, d)
        total += z.sum(axis=0)
        squared_error += float(((z - u) ** 2).sum())
        inner.append(z @ u / params.inv_m)
        norms = np.linalg.norm(z, axis=1)
        worst_norm = max(worst_norm, float(np.max(np.abs(norms / params.inv_m - 1))))
    return {
        "mean": total / n,
        "squared_error": squared_error / n,
        "inner": np.concatenate(inner),
        "worst_norm": worst_norm,
    }


def _inner_product_cdf(params: PrivUnitParams) -> Callable[[np.ndarray], np.ndarray]:
    """Exact CDF of T = <V, u>: a p : 1-p mixture of Beta(alpha, alpha) truncated at tau."""
    alpha, tau = (params.dim - 1) / 2, (1 + params.gamma) / 2
    below, above = special.betainc(alpha, alpha, tau), special.betainc(alpha, alpha, 1 - tau)

    def cdf(t: np.ndarray) -> np.ndarray:
        s = (1 + t) / 2
        low = (1 - params.p) * special.betainc(alpha, alpha, s) / below
        high = 1 - params.p * special.betainc(alpha, alpha, 1 - s) / above
        return np.where(t < params.gamma, low, high)

    return cdf


@pytest.mark.parametrize("dim", [10, 100, 1000])
@pytest.mark.parametrize("epsilon", [1.0, 4.0, 8.0])
def test_privunit_is_unbiased_with_the_predicted_error(epsilon: float, dim: int) -> None:
    n = 10**5
    params = calibrate_privunit(epsilon=epsilon, dim=dim)
    u = sign_unit(dim, seed=dim)
    draws = _privunit_draws(params, u, n, seed=int(10 * epsilon) + dim)

    assert draws["worst_norm"] < 1e-9  # ||Z|| = 1/m for every output
    coordinate_se = math.sqrt(params.squared_error / (n * dim))
    assert np.max(np.abs(draws["mean"] - u)) < K * coordinate_se
    assert draws["squared_error"] == pytest.approx(params.squared_error, rel=0.02)
    in_cap = float(np.mean(draws["inner"] >= params.gamma))
    assert abs(in_cap - params.p) < K * math.sqrt(params.p * (1 - params.p) / n)
    # The whole law of <V, u>, not only P(cap): DKW against the exact CDF.
    assert ks_distance(draws["inner"], _inner_product_cdf(params)) < dkw_bound(n)


def test_privunit_direction_off_u_is_uniform() -> None:
    # In d = 3 with u = e1, the angle of (V2, V3) must be uniform on (-pi, pi].
    n = 10**5
    params = calibrate_privunit(epsilon=2.0, dim=3)
    z = sample_privunit(np.array([1.0, 0.0, 0.0]), params, np.random.default_rng(6), n)
    angle = np.arctan2(z[:, 2], z[:, 1])
    assert ks_distance(angle, lambda a: (a + np.pi) / (2 * np.pi)) < dkw_bound(n)


def test_privunit_rejects_non_unit_inputs() -> None:
    params = calibrate_privunit(epsilon=1.0, dim=4)
    with pytest.raises(ValueError, match="unit vector"):
        privunit(np.ones(4), params, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unit vector"):
        privunit(np.array([1.0, 0.0, 0.0]), params, np.random.default_rng(0))


# --- ScalarDP ------------------------------------------------------------------------------

SCALAR_TABLE = [
    ((0.3, 1.0, 4, 2.0), 0.2235085),
    ((0.5, 1.0, 10, 5.0), 0.0080188),
    ((1.0, 1.0, 1, 1.0), 0.9206736),
    ((0.37, 2.0, 7, 3.0), 0.4454031),
]


@pytest.mark.parametrize(("case", "variance"), SCALAR_TABLE)
def test_scalar_dp_exact_moments_reference_values(
    case: tuple[float, float, int, float], variance: float
) -> None:
    value, max_value, levels, epsilon = case
    params = ScalarDPParams(epsilon=epsilon, levels=levels, max_value=max_value)
    mean, var = scalar_dp_moments(value, params)
    assert mean == pytest.approx(value, abs=1e-12)
    assert var == pytest.approx(variance, abs=5e-8)


@pytest.mark.parametrize(("case", "variance"), SCALAR_TABLE)
def test_scalar_dp_is_unbiased_with_the_exact_variance(
    case: tuple[float, float, int, float], variance: float
) -> None:
    value, max_value, levels, epsilon = case
    n = 10**6
    params = ScalarDPParams(epsilon=epsilon, levels=levels, max_value=max_value)
    draws = scalar_dp(np.full(n, value), params, np.random.default_rng(levels))
    assert abs(draws.mean() - value) < K * math.sqrt(variance / n)
    assert draws.var() == pytest.approx(variance, rel=0.03)
    assert np.all(np.isclose(draws[:, None], params.outputs()[None, :], atol=1e-12).any(axis=1))


def test_scalar_dp_debiasing_constants_are_the_papers() -> None:
    params = ScalarDPParams(epsilon=2.0, levels=4, max_value=1.0)
    e = math.exp(2.0)
    assert params.keep_probability == pytest.approx(e / (e + 4))
    assert params.scale == pytest.approx((e + 4) / (e - 1) / 4)
    assert params.offset == pytest.approx(4 * 5 / (2 * (e + 4)))


def test_scalar_dp_rejects_values_outside_the_range_and_bad_parameters() -> None:
    params = ScalarDPParams(epsilon=1.0, levels=3, max_value=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1.0\]"):
        scalar_dp(np.array([0.5, 1.5]), params, np.random.default_rng(0))
    with pytest.raises(ValueError, match="levels must be an integer >= 1"):
        ScalarDPParams(epsilon=1.0, levels=0, max_value=1.0)


# --- separated privatizer ---------------------------------------------------------------


def test_separated_privatizer_server_mean_estimates_the_clipped_update() -> None:
    dim, n, r_max = 20, 20000, 0.5
    update = 2.0 * sign_unit(dim, seed=7)  # norm 2: clipped to 0.5
    direction = calibrate_privunit(epsilon=4.0, dim=dim)
    magnitude = ScalarDPParams(epsilon=1.0, levels=4, max_value=r_max)
    rng = np.random.default_rng(8)
    outputs = np.stack(
        [
            privatize_separated(update, direction=direction, magnitude=magnitude, rng=rng)
            for _ in range(n)
        ]
    )
    clipped = update * r_max / 2.0
    # E||R Z||^2 = E[R^2] / m^2; with |u_i| = 1/sqrt(d) each coordinate of R Z - clip(D)
    # has variance (E||R Z||^2 - r^2) / d.
    mean_r, var_r = scalar_dp_moments(r_max, magnitude)
    second_moment = (var_r + mean_r**2) * direction.inv_m**2
    coordinate_se = math.sqrt((second_moment - r_max**2) / (dim * n))
    assert np.max(np.abs(outputs.mean(axis=0) - clipped)) < K * coordinate_se
    norms = np.linalg.norm(outputs, axis=1) / direction.inv_m  # |R_hat|
    assert np.all(np.isclose(norms[:, None], np.abs(magnitude.outputs()), atol=1e-9).any(axis=1))


def test_separated_privatizer_of_a_zero_update_is_centred() -> None:
    dim, n = 5, 20000
    direction = calibrate_privunit(epsilon=2.0, dim=dim)
    magnitude = ScalarDPParams(epsilon=1.0, levels=2, max_value=1.0)
    rng = np.random.default_rng(9)
    outputs = np.stack(
        [
            privatize_separated(np.zeros(dim), direction=direction, magnitude=magnitude, rng=rng)
            for _ in range(n)
        ]
    )
    _, var_r = scalar_dp_moments(0.0, magnitude)
    coordinate_se = math.sqrt(var_r * direction.inv_m**2 / (dim * n))
    assert np.max(np.abs(outputs.mean(axis=0))) < K * coordinate_se


# --- same seed, same noise -----------------------------------------------------------------

_UNIT = sign_unit(8, seed=0)
_PRIVUNIT = calibrate_privunit(epsilon=2.0, dim=8)
_SCALAR = ScalarDPParams(epsilon=1.0, levels=4, max_value=1.0)
MECHANISMS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "gaussian": lambda rng: add_gaussian_noise(np.zeros(8), std=1.0, rng=rng),
    "privunit": lambda rng: privunit(_UNIT, _PRIVUNIT, rng),
    "scalar_dp": lambda rng: scalar_dp(np.full(8, 0.3), _SCALAR, rng),
    "separated": lambda rng: privatize_separated(
        _UNIT, direction=_PRIVUNIT, magnitude=_SCALAR, rng=rng
    ),
    "noisy_average": lambda rng: noisy_average(
        np.ones(8), noise_multiplier=1.0, clip_norm=1.0, expected_cohort_size=10, rng=rng
    ),
    "poisson": lambda rng: np.array(poisson_cohort(range(100), rate=0.3, rng=rng)),
}


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_same_seed_gives_the_same_noise_and_another_seed_other_noise(name: str) -> None:
    mechanism = MECHANISMS[name]
    first = mechanism(np.random.default_rng(11))
    np.testing.assert_array_equal(first, mechanism(np.random.default_rng(11)))
    assert not np.array_equal(first, mechanism(np.random.default_rng(12)))
