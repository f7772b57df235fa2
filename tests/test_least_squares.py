"""Tests of the synthetic least-squares federation: Hessian spread, exact gradients, minimizer."""

import math

import pytest
import torch

from fedsim.data.least_squares import (
    global_minimizer,
    half_mse,
    least_squares_federation,
    least_squares_problem,
    linear_model,
    normal_equations,
    sample_workers,
)

T_SIGMAS = 5.0  # tail of every concentration bound below: failure prob ~ exp(-12.5)


def spectral_spread(matrices: torch.Tensor) -> float:
    """Max over pairs p < q of ||M_p - M_q||_2."""
    p = len(matrices)
    return max(
        (
            torch.linalg.matrix_norm(matrices[i] - matrices[j], ord=2).item()
            for i in range(p)
            for j in range(i + 1, p)
        ),
        default=0.0,
    )


def covariance_deviation_bound(n: int, d: int) -> float:
    """High-probability bound on ||Z^T Z / n - I||_2 for an (n, d) standard Gaussian Z.

    Vershynin (2012), Cor. 5.35: with probability >= 1 - 2 exp(-t^2 / 2) the singular
    values of Z / sqrt(n) lie in [1 - eps, 1 + eps], eps = sqrt(d / n) + t / sqrt(n),
    so the eigenvalues of Z^T Z / n lie in [(1 - eps)^2, (1 + eps)^2].
    """
    eps = math.sqrt(d / n) + T_SIGMAS / math.sqrt(n)
    return 2 * eps + eps**2


def grad_at(worker: torch.utils.data.TensorDataset, x: torch.Tensor) -> torch.Tensor:
    """The autograd gradient of half_mse(model(a), y) with the model's weight set to x."""
    model = linear_model(len(x))
    with torch.no_grad():
        model.weight.copy_(x[None, :])
    features, targets = worker.tensors
    half_mse(model(features), targets).backward()
    assert model.weight.grad is not None
    return model.weight.grad[0]


# --- the population Hessians ----------------------------------------------------------


@pytest.mark.parametrize("spread", [0.0, 0.3, 1.0, 1.9])
def test_population_hessians_are_within_the_spread(spread: float) -> None:
    problem = least_squares_problem(
        num_workers=8, num_features=6, hessian_spread=spread, optimum_spread=1.0, seed=0
    )
    diag = problem.hessian_diagonals
    assert diag.shape == (8, 6) and diag.dtype == torch.float64
    assert torch.all(diag >= 1 - spread / 2) and torch.all(diag <= 1 + spread / 2)
    # Diagonal matrices: the spectral norm of S_p - S_q is the largest entry difference.
    assert spectral_spread(torch.diag_embed(diag)) <= spread
    if spread == 0:
        assert torch.equal(diag, torch.ones_like(diag))


def test_population_spread_scales_linearly_with_the_knob() -> None:
    # Same seed, same uniforms u_p: S_p - I = spread * u_p.
    def centred(spread: float) -> torch.Tensor:
        problem = least_squares_problem(
            num_workers=5, num_features=4, hessian_spread=spread, optimum_spread=0.0, seed=4
        )
        return problem.hessian_diagonals - 1

    torch.testing.assert_close(centred(1.5), 3 * centred(0.5), rtol=1e-12, atol=1e-15)


# --- the empirical Hessians -----------------------------------------------------------


@pytest.mark.parametrize("spread", [0.0, 1.0, 1.9])
def test_empirical_hessians_concentrate_around_the_population(spread: float) -> None:
    n, d = 20_000, 5
    problem = least_squares_problem(
        num_workers=4, num_features=d, hessian_spread=spread, optimum_spread=0.0, seed=1
    )
    hessians, _ = normal_equations(sample_workers(problem, samples_per_worker=n))
    # A_p = S^1/2 (Z^T Z / n) S^1/2, so ||A_p - S_p|| <= ||S_p|| ||Z^T Z / n - I||.
    for hessian, diag in zip(hessians, problem.hessian_diagonals, strict=True):
        deviation = torch.linalg.matrix_norm(hessian - torch.diag(diag), ord=2).item()
        assert deviation <= diag.max().item() * covariance_deviation_bound(n, d)


def test_empirical_spread_grows_with_the_knob() -> None:
    n, d, spreads = 200_000, 4, (0.0, 0.5, 1.0, 1.5)
    bound = max(1 + s / 2 for s in spreads) * covariance_deviation_bound(n, d)
    population, empirical = [], []
    for spread in spreads:
        problem = least_squares_problem(
            num_workers=4, num_features=d, hessian_spread=spread, optimum_spread=0.0, seed=2
        )
        hessians, _ = normal_equations(sample_workers(problem, samples_per_worker=n))
        population.append(spectral_spread(torch.diag_embed(problem.hessian_diagonals)))
        empirical.append(spectral_spread(hessians))
    # By the triangle inequality each empirical spread is within 2 * bound of the
    # population one; steps of the population spread larger than 4 * bound then
    # make the empirical spread strictly increasing on the concentration event.
    assert min(b - a for a, b in zip(population, population[1:], strict=False)) > 4 * bound
    for pop, emp in zip(population, empirical, strict=True):
        assert abs(emp - pop) <= 2 * bound, (population, empirical)
    assert all(a < b for a, b in zip(empirical, empirical[1:], strict=False)), empirical
    assert population[0] == 0.0


# --- targets and optima ---------------------------------------------------------------


def test_target_noise_has_the_requested_variance() -> None:
    n, noise_std = 50_000, 0.1
    problem = least_squares_problem(
        num_workers=3, num_features=5, hessian_spread=0.5, optimum_spread=1.0, seed=3
    )
    for worker, optimum in zip(
        sample_workers(problem, samples_per_worker=n), problem.optima, strict=True
    ):
        features, targets = worker.tensors
        assert features.shape == (n, 5) and targets.shape == (n, 1)
        residual = targets[:, 0] - features @ optimum
        # Sample variance of n normals: standard error sigma^2 sqrt(2 / (n - 1)).
        se = noise_std**2 * math.sqrt(2 / (n - 1))
        assert abs(residual.var().item() - noise_std**2) <= T_SIGMAS * se
        assert abs(residual.mean().item()) <= T_SIGMAS * noise_std / math.sqrt(n)


def test_worker_optima_spread_is_chi_square() -> None:
    # d ||x*_p - x*||^2 / spread^2 ~ chi^2_d, so the sum over P workers is chi^2_{Pd}:
    # mean Pd, standard deviation sqrt(2 Pd).
    workers, d, spread = 200, 10, 0.7
    problem = least_squares_problem(
        num_workers=workers, num_features=d, hessian_spread=0.0, optimum_spread=spread, seed=5
    )
    statistic = d * ((problem.optima - problem.optimum) ** 2).sum().item() / spread**2
    dof = workers * d
    assert abs(statistic - dof) <= T_SIGMAS * math.sqrt(2 * dof)


# --- exact gradients and the minimizer ------------------------------------------------


def test_model_gradient_is_a_x_minus_b() -> None:
    workers = least_squares_federation(
        num_workers=3,
        num_features=6,
        samples_per_worker=500,
        hessian_spread=1.0,
        optimum_spread=1.0,
        seed=6,
    )
    hessians, vectors = normal_equations(workers)
    x = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for worker, hessian, vector in zip(workers, hessians, vectors, strict=True):
        torch.testing.assert_close(grad_at(worker, x), hessian @ x - vector, rtol=1e-12, atol=1e-13)


def test_global_minimizer_has_zero_full_gradient() -> None:
    workers = least_squares_federation(
        num_workers=5,
        num_features=8,
        samples_per_worker=200,
        hessian_spread=1.5,
        optimum_spread=2.0,
        seed=7,
    )
    x = global_minimizer(workers)
    full_grad = torch.stack([grad_at(worker, x) for worker in workers]).mean(dim=0)
    assert full_grad.norm().item() <= 1e-13
    # Heterogeneous optima: no single worker is at its own minimum there.
    assert min(grad_at(worker, x).norm().item() for worker in workers) > 1e-3


def test_noiseless_identical_optima_recover_the_centre() -> None:
    # y = a^T x* exactly on every worker, so x* minimizes every f_p and hence f.
    problem = least_squares_problem(
        num_workers=4, num_features=5, hessian_spread=1.0, optimum_spread=0.0, seed=8, noise_std=0
    )
    workers = sample_workers(problem, samples_per_worker=50)
    torch.testing.assert_close(global_minimizer(workers), problem.optimum, rtol=1e-10, atol=1e-12)


# --- seeding, shapes and errors -------------------------------------------------------


def federation(seed: int, num_workers: int = 4) -> list[torch.utils.data.TensorDataset]:
    return least_squares_federation(
        num_workers=num_workers,
        num_features=3,
        samples_per_worker=20,
        hessian_spread=1.0,
        optimum_spread=1.0,
        seed=seed,
    )


def test_same_seed_same_data_other_seed_other_data() -> None:
    first, again, other = federation(0), federation(0), federation(1)
    for a, b, c in zip(first, again, other, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))
        assert not torch.equal(a.tensors[0], c.tensors[0])


def test_a_worker_does_not_depend_on_the_federation_size() -> None:
    small, large = federation(0, num_workers=2), federation(0, num_workers=5)
    for a, b in zip(small, large[:2], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))


def test_draws_leave_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    federation(0)
    model = linear_model(3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(model.weight, torch.zeros(1, 3, dtype=torch.float64))


def test_float32_on_request() -> None:
    workers = least_squares_federation(
        num_workers=2,
        num_features=3,
        samples_per_worker=4,
        hessian_spread=0.5,
        optimum_spread=0.5,
        seed=0,
        dtype=torch.float32,
    )
    assert all(t.dtype == torch.float32 for w in workers for t in w.tensors)


def test_half_mse_by_hand() -> None:
    outputs = torch.tensor([[1.0], [3.0]])
    assert half_mse(outputs, torch.zeros(2, 1)).item() == 2.5  # 0.5 * (1 + 9) / 2
    with pytest.raises(ValueError, match=r"same shape, got \(2, 1\) and \(2,\)"):
        half_mse(outputs, torch.zeros(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hessian_spread": 2.0}, r"hessian_spread must be in \[0, 2\), got 2.0"),
        ({"hessian_spread": -0.1}, r"hessian_spread must be in \[0, 2\), got -0.1"),
        ({"optimum_spread": -1.0}, "optimum_spread must be >= 0, got -1.0"),
        ({"noise_std": -0.1}, "noise_std must be >= 0, got -0.1"),
        ({"num_workers": 0}, "num_workers must be >= 1, got 0"),
        ({"num_features": 0}, "num_features must be >= 1, got 0"),
        ({"samples_per_worker": 0}, "samples_per_worker must be >= 1, got 0"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs: dict[str, float], message: str) -> None:
    args: dict = {
        "num_workers": 2,
        "num_features": 3,
        "samples_per_worker": 4,
        "hessian_spread": 0.5,
        "optimum_spread": 0.5,
        "seed": 0,
    }
    with pytest.raises(ValueError, match=message):
        least_squares_federation(**{**args, **kwargs})
