"""BVR-L-SGD and its baselines against the spec's checks (Murata & Suzuki, ICML 2021).

Quadratic workers are least-squares data sets in float64: with full local batches
every gradient is exact, so the reductions hold to rounding error.
"""

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch.utils.data import TensorDataset

from fedsim import keys
from fedsim.arrays import arrays_of
from fedsim.clients import TorchTask, make_client_app
from fedsim.clients.local_routines import LocalData, local_steps
from fedsim.data.least_squares import (
    half_mse,
    least_squares_federation,
    linear_model,
    normal_equations,
)
from fedsim.engine import InlineGrid
from fedsim.loop import RoundReport, run_rounds
from fedsim.seeding import torch_generator
from fedsim.strategies import BVRLSGD, SARAH, SCAFFOLD, FedAvg, LocalSGD, MinibatchSGD

D = 4  # features: the model is nn.Linear(D, 1, bias=False), d = D parameters


def centered_quadratic(center: np.ndarray) -> TensorDataset:
    """Samples whose half-MSE is exactly f(x) = ½‖x - center‖² (a_i = √D e_i)."""
    scale = math.sqrt(D)
    inputs = torch.eye(D, dtype=torch.float64) * scale
    targets = torch.as_tensor(center, dtype=torch.float64).reshape(D, 1) * scale
    return TensorDataset(inputs, targets)


def features(workers: list[TensorDataset]) -> int:
    return workers[0].tensors[0].shape[1]


def grid_for(workers: list[TensorDataset]) -> InlineGrid:
    task = TorchTask(
        model_fn=lambda: linear_model(features(workers)),
        loss_fn=half_mse,
        load_partition=lambda partition, _n: workers[partition],
    )
    algorithms = [BVRLSGD, SARAH, MinibatchSGD, LocalSGD, SCAFFOLD]
    return InlineGrid(make_client_app(task, algorithms=algorithms), num_nodes=len(workers))


def run(strategy, workers, *, rounds: int, start: np.ndarray | None = None):
    """Run ``rounds`` rounds; return the final point (D,) and the round reports."""
    reports: list[RoundReport] = []

    class Keep:
        def on_round(self, report: RoundReport) -> None:
            reports.append(report)

    d = features(workers)
    point = np.zeros((1, d)) if start is None else start.reshape(1, d)
    final = run_rounds(
        strategy=strategy,
        grid=grid_for(workers),
        initial_arrays=ArrayRecord({"weight": torch.as_tensor(point)}),
        num_rounds=rounds,
        train_config=ConfigRecord({keys.SEED: 0}),
        observers=[Keep()],
    )
    return arrays_of(final)["weight"].reshape(d), reports[1:]


def everyone(num_workers: int) -> dict:
    return {
        "fraction_train": 1.0,
        "min_train_nodes": num_workers,
        "fraction_evaluate": 0.0,
        "min_evaluate_nodes": 0,
        "min_available_nodes": num_workers,
    }


def gradient(workers: list[TensorDataset], point: np.ndarray) -> np.ndarray:
    """∇f(x) for f = (1/P) Σ_p f_p, from the exact normal equations."""
    hessians, vectors = normal_equations(workers)
    x = torch.tensor(point, dtype=torch.float64)
    return ((hessians @ x) - vectors).mean(dim=0).numpy()


def gradient_descent(workers, start: np.ndarray, lr: float, steps: int) -> np.ndarray:
    point = start.copy()
    for _ in range(steps):
        point = point - lr * gradient(workers, point)
    return point


def test_bvr_takes_one_workers_model_bit_for_bit_not_the_average() -> None:
    centers = [np.full(D, 1.0), np.arange(D, dtype=float), -np.arange(D, dtype=float) * 2]
    workers = [centered_quadratic(c) for c in centers]
    lr, steps = 0.1, 3
    strategy = BVRLSGD(
        lr=lr, batch_size=1, local_steps=steps, stage_rounds=5, seed=3, **everyone(3)
    )
    final, reports = run(strategy, workers, rounds=1)

    # Each worker's LocalRoutine from x_0 = 0 with ṽ_1 = mean_p ∇f_p(0), recomputed here.
    start = {"weight": torch.zeros(1, D, dtype=torch.float64)}
    estimate = {"weight": torch.as_tensor(-np.mean(centers, axis=0).reshape(1, D))}
    candidates = []
    for partition, data in enumerate(workers):
        last, _ = local_steps(
            linear_model(D),
            half_mse,
            start,
            LocalData(*data.tensors),
            lr=lr,
            steps=steps,
            batch_size=1,
            # The draws a client makes: keyed by (seed, round, partition, message type).
            generator=torch_generator(0, 1, partition, keys.TRAIN_LOCAL),
            estimate=estimate,
        )
        candidates.append(last["weight"].numpy().reshape(D))
    matches = [i for i, c in enumerate(candidates) if np.array_equal(final, c)]
    assert len({c.tobytes() for c in candidates}) == 3  # minibatches make the workers differ
    assert len(matches) == 1, (final, candidates)
    assert reports[0].train["picked-node"] - 2 == matches[0]  # node ids start at 2
    assert not np.allclose(final, np.mean(candidates, axis=0))


@pytest.mark.parametrize("num_workers", [1, 3])
def test_bvr_on_identical_full_batch_quadratics_is_gradient_descent(num_workers: int) -> None:
    """P = 1, or P identical workers (ζ = 0): BVR-L-SGD is GD with T·K steps."""
    (data,) = least_squares_federation(
        num_workers=1,
        num_features=D,
        samples_per_worker=12,
        hessian_spread=0.5,
        optimum_spread=0.0,
        seed=1,
    )
    workers = [data] * num_workers
    lr, steps, rounds = 0.2, 4, 6
    strategy = BVRLSGD(
        lr=lr,
        batch_size=12,
        local_steps=steps,
        stage_rounds=3,
        seed=0,
        **everyone(num_workers),
    )
    final, _ = run(strategy, workers, rounds=rounds)
    expected = gradient_descent(workers, np.zeros(D), lr, steps * rounds)
    assert np.linalg.norm(expected) > 0.1  # it moved
    np.testing.assert_allclose(final, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy_class", [BVRLSGD, SARAH])
def test_estimate_is_the_full_gradient_at_the_previous_point(strategy_class) -> None:
    """Full local batches on heterogeneous quadratics: ṽ_t = ∇f(x_{t-1}) after every round."""
    workers = least_squares_federation(
        num_workers=3,
        num_features=D,
        samples_per_worker=10,
        hessian_spread=1.0,
        optimum_spread=1.0,
        seed=2,
    )
    points, estimates = [], []

    class Recording(strategy_class):  # type: ignore[misc, valid-type]
        def train_round(self, server_round, arrays, config, grid):
            points.append(arrays_of(arrays)["weight"].reshape(D).copy())
            result = yield from super().train_round(server_round, arrays, config, grid)
            estimates.append(self.estimate["weight"].reshape(D).copy())
            return result

    strategy = Recording(
        lr=0.1, batch_size=10, local_steps=3, stage_rounds=4, seed=0, **everyone(3)
    )
    run(strategy, workers, rounds=7)  # two stages: restarts included
    assert len(points) == len(estimates) == 7
    for point, estimate in zip(points, estimates, strict=True):
        np.testing.assert_allclose(estimate, gradient(workers, point), rtol=1e-9, atol=1e-12)
    assert not np.allclose(points[-1], points[0])


def model_floats() -> int:
    return D  # nn.Linear(D, 1, bias=False)


@pytest.mark.parametrize(
    ("make", "down_per_worker", "up_per_worker", "extra_down", "extra_up", "exchanges"),
    [
        (lambda kw: FedAvg(seed=0, **kw), 1, 1, 0, 0, 1),
        (lambda kw: MinibatchSGD(lr=0.1, batch_size=4, **kw), 1, 1, 0, 0, 1),
        (lambda kw: LocalSGD(lr=0.1, batch_size=4, local_steps=2, **kw), 1, 1, 0, 0, 1),
        (lambda kw: SARAH(lr=0.1, batch_size=4, stage_rounds=2, **kw), 1, 1, 0, 0, 1),
        (lambda kw: SCAFFOLD(lr=0.1, batch_size=4, local_steps=2, **kw), 2, 2, 0, 0, 1),
        # BVR's cheaper protocol: x to all, (x, ṽ) to the picked worker; ṽ^(p) from all,
        # the picked worker's model back.
        (
            lambda kw: BVRLSGD(lr=0.1, batch_size=2, local_steps=2, stage_rounds=2, **kw),
            1,
            1,
            2,
            1,
            2,
        ),
    ],
    ids=["fedavg", "minibatch-sgd", "local-sgd", "sarah", "scaffold", "bvr-l-sgd"],
)
def test_communication_counters(
    make, down_per_worker, up_per_worker, extra_down, extra_up, exchanges
) -> None:
    workers = least_squares_federation(
        num_workers=5,
        num_features=D,
        samples_per_worker=8,
        hessian_spread=0.5,
        optimum_spread=0.5,
        seed=0,
    )
    d, p = model_floats(), len(workers)
    _, reports = run(make(everyone(p)), workers, rounds=3)  # a stage start and a later round
    for report in reports:
        assert report.downlink_floats == (down_per_worker * p + extra_down) * d
        assert report.uplink_floats == (up_per_worker * p + extra_up) * d
        assert report.exchanges == exchanges
        assert report.failures == 0


def test_scaffold_corrects_client_drift_that_local_sgd_keeps() -> None:
    """Full batches, heterogeneous quadratics, K > 1: Local SGD's fixed point is biased,
    SCAFFOLD's control variates remove the bias and it converges to the minimizer."""
    workers = least_squares_federation(
        num_workers=3,
        num_features=D,
        samples_per_worker=10,
        hessian_spread=1.0,
        optimum_spread=2.0,
        seed=4,
    )
    hessians, vectors = normal_equations(workers)
    optimum = torch.linalg.solve(hessians.mean(0), vectors.mean(0)).numpy()
    settings = {"lr": 0.1, "batch_size": 10, "local_steps": 5, "seed": 0, **everyone(3)}
    scaffold, _ = run(SCAFFOLD(**settings), workers, rounds=300)
    local_sgd, _ = run(LocalSGD(**settings), workers, rounds=300)
    assert np.linalg.norm(scaffold - optimum) < 1e-8
    assert np.linalg.norm(local_sgd - optimum) > 1e-3


def test_scaffold_keeps_each_clients_control_variate_in_its_context() -> None:
    workers = least_squares_federation(
        num_workers=3,
        num_features=D,
        samples_per_worker=6,
        hessian_spread=0.5,
        optimum_spread=1.0,
        seed=5,
    )
    grid = grid_for(workers)
    strategy = SCAFFOLD(lr=0.1, batch_size=6, local_steps=2, seed=0, **everyone(3))
    run_rounds(
        strategy=strategy,
        grid=grid,
        initial_arrays=ArrayRecord({"weight": torch.zeros(1, D, dtype=torch.float64)}),
        num_rounds=2,
        train_config=ConfigRecord({keys.SEED: 0}),
    )
    controls = [
        arrays_of(grid.nodes.context(node).state[keys.CLIENT_CONTROL])["weight"]
        for node in grid.get_node_ids()
    ]
    # c = (|S|/N) Σ_rounds mean_p Δc_p = mean_p c_p with everyone participating.
    np.testing.assert_allclose(strategy.control["weight"], np.mean(controls, axis=0), atol=1e-12)
    assert not np.allclose(controls[0], controls[1])


def test_one_exchange_api_is_refused_with_a_clear_error() -> None:
    strategy = BVRLSGD(lr=0.1, batch_size=2, stage_rounds=2)
    with pytest.raises(TypeError, match="several exchanges per round"):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None)  # type: ignore[arg-type]


def test_start_runs_the_strategy_as_flowers_start_does() -> None:
    workers = least_squares_federation(
        num_workers=3,
        num_features=D,
        samples_per_worker=8,
        hessian_spread=0.5,
        optimum_spread=0.5,
        seed=6,
    )
    strategy = BVRLSGD(lr=0.1, batch_size=4, local_steps=2, stage_rounds=2, seed=0, **everyone(3))
    result = strategy.start(
        grid=grid_for(workers),
        initial_arrays=ArrayRecord({"weight": torch.zeros(1, D, dtype=torch.float64)}),
        num_rounds=3,
        train_config=ConfigRecord({keys.SEED: 0}),
    )
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert arrays_of(result.arrays)["weight"].any()


def rounds_to_reach(strategy, workers, *, tolerance: float, max_rounds: int) -> float:
    """Rounds until ‖∇f(x_t)‖² <= tolerance · ‖∇f(x_0)‖² (inf if never)."""
    points = []
    train_round = strategy.train_round

    def recording(server_round, arrays, config, grid):
        points.append(arrays_of(arrays)["weight"].reshape(-1).copy())
        return (yield from train_round(server_round, arrays, config, grid))

    strategy.train_round = recording
    final, _ = run(strategy, workers, rounds=max_rounds)
    points.append(final)
    norms = [float(np.sum(gradient(workers, x) ** 2)) for x in points]
    reached = [t for t, norm in enumerate(norms) if norm <= tolerance * norms[0]]
    return reached[0] if reached else math.inf


@pytest.mark.slow
@pytest.mark.parametrize("hessian_spread", [0.0, 0.5])
def test_bvr_needs_fewer_rounds_than_local_and_minibatch_sgd_at_small_spread(
    hessian_spread: float,
) -> None:
    """The spec's synthetic check, at equal budget B = 64 per worker per round (K = 4,
    b = 16 for the local methods; b = B for minibatch SGD), each method at its best
    step size of a fixed grid, ε = 1e-3 relative."""
    workers = least_squares_federation(
        num_workers=8,
        num_features=20,
        samples_per_worker=256,
        hessian_spread=hessian_spread,
        optimum_spread=1.0,
        seed=0,
    )
    common = {"seed": 0, **everyone(8)}
    methods = {
        "bvr-l-sgd": lambda lr: BVRLSGD(
            lr=lr, batch_size=16, local_steps=4, stage_rounds=10, **common
        ),
        "local-sgd": lambda lr: LocalSGD(lr=lr, batch_size=16, local_steps=4, **common),
        "minibatch-sgd": lambda lr: MinibatchSGD(lr=lr, batch_size=64, **common),
    }
    best = {
        name: min(
            rounds_to_reach(make(lr), workers, tolerance=1e-3, max_rounds=100)
            for lr in (0.05, 0.1, 0.2, 0.4)
        )
        for name, make in methods.items()
    }
    assert best["bvr-l-sgd"] < min(best["local-sgd"], best["minibatch-sgd"]), best
