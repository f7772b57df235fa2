"""A synthetic least-squares federation whose Hessian spread is a knob.

Murata & Suzuki (ICML 2021, arXiv 2102.03198) measure heterogeneity by the
second-order dissimilarity ``zeta``: ``||hess f_p - hess f_q|| <= zeta``. For a
least-squares worker ``f_p(x) = 1/2 E (a^T x - y)^2`` the Hessian is the feature
covariance ``S_p = E[a a^T]``, so ``zeta`` can be set directly:

- ``S_p = diag(1 + hessian_spread * u_p)``, ``u_p ~ Uniform[-1/2, 1/2]^d``, so
  ``||S_p - S_q||_2 <= hessian_spread`` (and ``S_p`` stays positive definite for
  ``hessian_spread < 2``);
- features ``a = S_p^{1/2} z``, ``z ~ N(0, I)``;
- targets ``y = a^T x*_p + noise_std * e``, ``e ~ N(0, 1)``, with worker optima
  ``x*_p = x* + optimum_spread * xi_p / sqrt(d)``, ``xi_p ~ N(0, I)`` and
  ``x* ~ N(0, I / d)`` (so ``||x*|| ~ 1``).

The spread is exact in the population; a finite sample's empirical Hessian
``A_p = mean a a^T`` only concentrates around ``S_p``. :func:`normal_equations`
returns the ``A_p`` and ``b_p`` the workers actually optimize, for tests and for
measuring ``||grad f||`` exactly.

Every draw comes from a generator keyed by ``(seed, worker, purpose)``, so
worker ``p``'s problem and samples do not depend on how many workers there are.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch's own convention)
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from fedsim.data.datasets import CentralDataset
from fedsim.seeding import SERVER_NODE, torch_generator

DEFAULT_NOISE_STD = 0.1


@dataclass(frozen=True)
class LeastSquaresProblem:
    """The population of each worker: its Hessian and its optimum.

    Attributes
    ----------
    hessian_diagonals : torch.Tensor
        Shape ``(P, d)``: the diagonal of each worker's population Hessian ``S_p``.
    optimum : torch.Tensor
        Shape ``(d,)``: the shared centre ``x*`` of the worker optima.
    optima : torch.Tensor
        Shape ``(P, d)``: each worker's population minimizer ``x*_p``.
    noise_std : float
        Standard deviation of the target noise.
    seed : int
        Root seed of the problem; :func:`sample_workers` draws from it too.
    """

    hessian_diagonals: Tensor
    optimum: Tensor
    optima: Tensor
    noise_std: float
    seed: int


def least_squares_problem(
    *,
    num_workers: int,
    num_features: int,
    hessian_spread: float,
    optimum_spread: float,
    seed: int,
    noise_std: float = DEFAULT_NOISE_STD,
    dtype: torch.dtype = torch.float64,
) -> LeastSquaresProblem:
    """Draw the population parameters (``S_p``, ``x*``, ``x*_p``) of every worker."""
    for name, value in (("num_workers", num_workers), ("num_features", num_features)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= hessian_spread < 2:
        # At 2 a diagonal entry of S_p can reach 0: a worker with a singular Hessian.
        raise ValueError(f"hessian_spread must be in [0, 2), got {hessian_spread}")
    if not optimum_spread >= 0:
        raise ValueError(f"optimum_spread must be >= 0, got {optimum_spread}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    d = num_features
    centre = torch_generator(seed, 0, SERVER_NODE, "least-squares-optimum")
    optimum = torch.randn(d, generator=centre, dtype=dtype) / d**0.5
    diagonals, optima = [], []
    for p in range(num_workers):
        gen = torch_generator(seed, 0, p + 1, "least-squares-problem")
        u = torch.rand(d, generator=gen, dtype=dtype) - 0.5
        xi = torch.randn(d, generator=gen, dtype=dtype)
        diagonals.append(1 + hessian_spread * u)
        optima.append(optimum + optimum_spread * xi / d**0.5)
    return LeastSquaresProblem(
        hessian_diagonals=torch.stack(diagonals),
        optimum=optimum,
        optima=torch.stack(optima),
        noise_std=float(noise_std),
        seed=seed,
    )


def sample_workers(problem: LeastSquaresProblem, *, samples_per_worker: int) -> list[TensorDataset]:
    """Draw each worker's ``(a, y)`` samples: features ``(n, d)``, targets ``(n, 1)``."""
    if samples_per_worker < 1:
        raise ValueError(f"samples_per_worker must be >= 1, got {samples_per_worker}")
    n, dtype = samples_per_worker, problem.optima.dtype
    workers = []
    for p, (diagonal, optimum) in enumerate(
        zip(problem.hessian_diagonals, problem.optima, strict=True)
    ):
        gen = torch_generator(problem.seed, 0, p + 1, "least-squares-samples")
        features = torch.randn(n, len(diagonal), generator=gen, dtype=dtype) * diagonal.sqrt()
        noise = torch.randn(n, generator=gen, dtype=dtype)
        targets = features @ optimum + problem.noise_std * noise
        workers.append(TensorDataset(features, targets[:, None]))  # (n,) -> (n, 1)
    return workers


def least_squares_federation(
    *,
    num_workers: int,
    num_features: int,
    samples_per_worker: int,
    hessian_spread: float,
    optimum_spread: float,
    seed: int,
    noise_std: float = DEFAULT_NOISE_STD,
    dtype: torch.dtype = torch.float64,
) -> list[TensorDataset]:
    """Draw a problem and its samples in one call: one ``(a, y)`` dataset per worker.

    Parameters
    ----------
    num_workers, num_features : int
        ``P`` and ``d``, both >= 1.
    samples_per_worker : int
        ``n``, the same for every worker.
    hessian_spread : float
        ``zeta`` in ``[0, 2)``: a bound on ``||S_p - S_q||_2`` (attained up to the
        spread of the uniform draws).
    optimum_spread : float
        Scale (>= 0) of the worker optima around ``x*``: ``E||x*_p - x*||^2`` is its square.
    seed : int
        Root seed of every draw.
    noise_std : float
        Standard deviation (>= 0) of the target noise.
    dtype : torch.dtype
        Floating type of the tensors; float64 makes exact-gradient tests meaningful.

    Returns
    -------
    list[TensorDataset]
        For each worker, features of shape ``(n, d)`` and targets of shape ``(n, 1)``.
    """
    problem = least_squares_problem(
        num_workers=num_workers,
        num_features=num_features,
        hessian_spread=hessian_spread,
        optimum_spread=optimum_spread,
        seed=seed,
        noise_std=noise_std,
        dtype=dtype,
    )
    return sample_workers(problem, samples_per_worker=samples_per_worker)


def half_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Return ``1/2 * mean (outputs - targets)^2``, whose gradient is ``A x - b`` without a 2.

    Shapes must match: an ``(n, 1)`` output against ``(n,)`` targets would
    broadcast to an ``(n, n)`` difference and silently give a wrong loss.
    """
    if outputs.shape != targets.shape:
        raise ValueError(
            f"outputs and targets must have the same shape, got {tuple(outputs.shape)} "
            f"and {tuple(targets.shape)}"
        )
    return 0.5 * F.mse_loss(outputs, targets)


def linear_model(num_features: int, *, dtype: torch.dtype = torch.float64) -> nn.Linear:
    """Return ``x -> a^T x`` as ``nn.Linear(d, 1, bias=False)``, starting at ``x = 0``.

    ``skip_init`` avoids the default initialization, which would draw from
    torch's global RNG only for the weights to be overwritten.
    """
    model = nn.utils.skip_init(nn.Linear, num_features, 1, bias=False, dtype=dtype)
    nn.init.zeros_(model.weight)
    return model


def normal_equations(workers: Sequence[TensorDataset]) -> tuple[Tensor, Tensor]:
    """Return each worker's empirical ``A_p = mean a a^T`` and ``b_p = mean a y``.

    ``f_p(x) = 1/2 x^T A_p x - b_p^T x + const``, so ``grad f_p(x) = A_p x - b_p``.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``A`` of shape ``(P, d, d)`` and ``b`` of shape ``(P, d)``.
    """
    hessians, vectors = [], []
    for worker in workers:
        features, targets = worker.tensors
        n = len(features)
        hessians.append(features.T @ features / n)
        vectors.append(features.T @ targets[:, 0] / n)
    return torch.stack(hessians), torch.stack(vectors)


def global_minimizer(workers: Sequence[TensorDataset]) -> Tensor:
    """Return the minimizer of ``f = mean_p f_p``: the solution of ``mean A_p x = mean b_p``.

    Workers weigh equally, as in the paper's objective, whatever their sizes.
    """
    hessians, vectors = normal_equations(workers)
    return torch.linalg.solve(hessians.mean(dim=0), vectors.mean(dim=0))


#: The shape of the ``"least-squares"`` dataset a config names: features per sample,
#: samples per client, and the spreads of the clients' Hessians and optima.
DATASET_FEATURES, DATASET_SAMPLES = 20, 100
DATASET_HESSIAN_SPREAD, DATASET_OPTIMUM_SPREAD = 0.5, 1.0


def load_least_squares(
    *, num_clients: int, seed: int, test_fraction: float = 0.2
) -> tuple[CentralDataset, list[np.ndarray]]:
    """Return the federation as a ``"regression"`` dataset in float32, split by client.

    Each client's last ``test_fraction`` of samples go to the shared test split.
    Returns the pooled dataset and each client's train indices, like
    :func:`fedsim.data.datasets.load_synthetic`.
    """
    workers = least_squares_federation(
        num_workers=num_clients,
        num_features=DATASET_FEATURES,
        samples_per_worker=DATASET_SAMPLES,
        hessian_spread=DATASET_HESSIAN_SPREAD,
        optimum_spread=DATASET_OPTIMUM_SPREAD,
        seed=seed,
        dtype=torch.float32,
    )
    n_train = DATASET_SAMPLES - int(test_fraction * DATASET_SAMPLES)
    features = torch.stack([worker.tensors[0] for worker in workers])  # (P, n, d)
    targets = torch.stack([worker.tensors[1] for worker in workers])  # (P, n, 1)
    central = CentralDataset(
        train_x=features[:, :n_train].reshape(-1, DATASET_FEATURES),
        train_y=targets[:, :n_train].reshape(-1, 1),
        test_x=features[:, n_train:].reshape(-1, DATASET_FEATURES),
        test_y=targets[:, n_train:].reshape(-1, 1),
        num_classes=1,
        task="regression",
    )
    return central, [np.arange(p * n_train, (p + 1) * n_train) for p in range(num_clients)]
