"""Central DP around any strategy, and Apple-style local privatization on the client."""

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedsim import keys
from fedsim.arrays import arrays_of, to_array_record
from fedsim.cli import main
from fedsim.clients.private_update import (
    LDP_EPSILON,
    SeparatedPrivatization,
    norm_bound,
    separated_privatization_mod,
)
from fedsim.engine import InlineGrid
from fedsim.loop import RoundReport, run_rounds
from fedsim.privacy.accounting import FixedSizeRdpAccountant, RdpAccountant
from fedsim.strategies import CentralDP, FedAvg
from tests.conftest import DEMO_CONFIG


def constant_update_app(update: np.ndarray, mods=()) -> ClientApp:
    """Every client returns the global model plus ``update`` (a flat 'w' vector)."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(message: Message, context: Context) -> Message:
        model = arrays_of(message.content[keys.ARRAYS])["w"]
        content = RecordDict(
            {
                keys.ARRAYS: to_array_record({"w": model + update}),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 1.0}),
            }
        )
        return Message(content, reply_to=message)

    return app


def run(strategy, app: ClientApp, *, population: int, dim: int, rounds: int = 1):
    reports: list[RoundReport] = []

    class Keep:
        def on_round(self, report: RoundReport) -> None:
            reports.append(report)

    final = run_rounds(
        strategy=strategy,
        grid=InlineGrid(app, num_nodes=population),
        initial_arrays=to_array_record({"w": np.zeros(dim)}),
        num_rounds=rounds,
        train_config=ConfigRecord({keys.SEED: 0}),
        observers=[Keep()],
    )
    return arrays_of(final)["w"], reports[1:]


def inner() -> FedAvg:
    return FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1)


def test_noise_on_the_average_is_z_s_over_the_expected_cohort() -> None:
    z, clip, cohort, dim = 1.3, 0.7, 8, 1_000_000
    strategy = CentralDP(
        inner(), noise_multiplier=z, clip_norm=clip, expected_cohort_size=cohort, sampling="fixed"
    )
    final, _ = run(strategy, constant_update_app(np.zeros(dim)), population=20, dim=dim)
    # Zero updates: the new model is pure noise of std zS/C̄; 1% is 14 standard errors.
    assert np.std(final) == pytest.approx(z * clip / cohort, rel=0.01)
    assert abs(np.mean(final)) < 5 * z * clip / cohort / np.sqrt(dim)


def test_each_contribution_is_clipped_to_s_and_divided_by_the_expected_cohort() -> None:
    clip, cohort, dim = 0.5, 5, 100
    huge = np.full(dim, 10.0)
    strategy = CentralDP(
        inner(), noise_multiplier=0.0, clip_norm=clip, expected_cohort_size=cohort, sampling="fixed"
    )
    final, reports = run(strategy, constant_update_app(huge), population=5, dim=dim)
    # Five clients, each clipped to norm S, summed, divided by C̄ = 5: norm S, direction kept.
    assert np.linalg.norm(final) == pytest.approx(clip, rel=1e-9)
    np.testing.assert_allclose(final / np.linalg.norm(final), huge / np.linalg.norm(huge))
    assert reports[0].train["dp-cohort"] == 5


def test_dividing_by_the_expected_not_the_realized_cohort() -> None:
    """Poisson cohorts vary in size; the sum is still divided by C̄."""
    cohort, population, dim = 10, 100, 4
    update = np.array([0.1, 0.0, 0.0, 0.0])
    strategy = CentralDP(
        inner(), noise_multiplier=0.0, clip_norm=1.0, expected_cohort_size=cohort, seed=1
    )
    final, reports = run(strategy, constant_update_app(update), population=population, dim=dim)
    realized = reports[0].train["dp-cohort"]
    assert realized != cohort  # this seed's Poisson draw is not exactly C̄
    np.testing.assert_allclose(final, update * realized / cohort)


def test_poisson_cohorts_average_the_expected_size() -> None:
    cohort, population, rounds = 10, 100, 200
    strategy = CentralDP(inner(), noise_multiplier=0.0, clip_norm=1.0, expected_cohort_size=cohort)
    _, reports = run(
        strategy, constant_update_app(np.zeros(2)), population=population, dim=2, rounds=rounds
    )
    sizes = np.array([r.train["dp-cohort"] for r in reports])
    q = cohort / population
    assert abs(sizes.mean() - cohort) <= 5 * np.sqrt(cohort * (1 - q) / rounds)


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_epsilon_is_reported_every_round_as_the_accountant_computes_it(sampling: str) -> None:
    z, cohort, population, rounds = 1.1, 10, 200, 5
    strategy = CentralDP(
        inner(),
        noise_multiplier=z,
        clip_norm=1.0,
        expected_cohort_size=cohort,
        sampling=sampling,  # type: ignore[arg-type]
        delta=1e-5,
    )
    _, reports = run(
        strategy, constant_update_app(np.zeros(3)), population=population, dim=3, rounds=rounds
    )
    expected = RdpAccountant() if sampling == "poisson" else FixedSizeRdpAccountant(population)
    for report in reports:
        expected.step(noise_multiplier=z, sample_rate=cohort / population)
        assert report.privacy["epsilon"] == pytest.approx(expected.epsilon(1e-5), rel=1e-12)
        assert report.privacy["delta"] == 1e-5
    epsilons = [r.privacy["epsilon"] for r in reports]
    assert epsilons == sorted(epsilons)


def test_calibrating_for_a_larger_deployed_cohort_scales_the_noise_and_the_accounting() -> None:
    """pfl-research's option: simulate 8 clients, noise and ε of 1000 out of 10^6."""
    z, clip, dim = 1.0, 1.0, 200_000
    strategy = CentralDP(
        inner(),
        noise_multiplier=z,
        clip_norm=clip,
        expected_cohort_size=8,
        sampling="fixed",
        noise_cohort_size=1000,
        accounting_population=1_000_000,
    )
    final, reports = run(strategy, constant_update_app(np.zeros(dim)), population=20, dim=dim)
    assert np.std(final) == pytest.approx(z * clip / 1000, rel=0.02)
    expected = FixedSizeRdpAccountant(1_000_000)
    expected.step(noise_multiplier=z, sample_rate=1000 / 1_000_000)
    assert reports[0].privacy["epsilon"] == pytest.approx(expected.epsilon(1e-5), rel=1e-12)


def test_wraps_flowers_own_strategy() -> None:
    flower = FlowerFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1)
    strategy = CentralDP(
        flower, noise_multiplier=0.0, clip_norm=10.0, expected_cohort_size=4, sampling="fixed"
    )
    update = np.array([0.25, -0.5])
    final, _ = run(strategy, constant_update_app(update), population=4, dim=2)
    np.testing.assert_allclose(final, update)


def test_local_privatization_is_unbiased_and_bounded() -> None:
    """Many clients with one update: the server mean estimates the clipped update."""
    dim, clients = 20, 2000
    settings = SeparatedPrivatization(
        epsilon_direction=8.0, epsilon_magnitude=4.0, clip_radius=1.0, levels=8
    )
    update = np.linspace(-1, 1, dim) * 0.1  # norm < clip radius
    app = constant_update_app(update, mods=[separated_privatization_mod(settings)])
    grid = InlineGrid(app, num_nodes=clients)
    content = RecordDict(
        {
            keys.ARRAYS: to_array_record({"w": np.zeros(dim)}),
            keys.CONFIG: ConfigRecord({keys.SEED: 0, keys.SERVER_ROUND: 1}),
        }
    )
    replies = list(
        grid.send_and_receive([Message(content, node, "train") for node in grid.get_node_ids()])
    )
    privatized = np.array([arrays_of(r.content[keys.ARRAYS])["w"] for r in replies])
    assert all(r.content[keys.METRICS][LDP_EPSILON] == 12.0 for r in replies)
    assert np.all(np.linalg.norm(privatized, axis=1) <= norm_bound(settings, dim) * (1 + 1e-9))
    # Unbiased: each coordinate of the mean within 5 standard errors of the update.
    standard_error = privatized.std(axis=0, ddof=1) / np.sqrt(clients)
    assert np.all(np.abs(privatized.mean(axis=0) - update) <= 5 * standard_error)
    assert len({p.tobytes() for p in privatized}) == clients  # each client's own noise


def test_privacy_config_runs_and_reports_epsilon(tmp_path: Path) -> None:
    sets = [
        "rounds=3", "data.num_clients=20", "strategy.clients_per_round=5", "model.name=logreg",
        "client.local_epochs=1", "privacy.central_dp=true", "privacy.local_dp=true",
        "privacy.clip_norm=0.5", f"output_dir={tmp_path}", "name=private", "progress=false",
        "plot=false",
    ]  # fmt: skip
    assert main(["run", DEMO_CONFIG, *[a for s in sets for a in ("--set", s)]]) == 0
    rows = [json.loads(line) for line in (tmp_path / "private" / "metrics.jsonl").open()][1:]
    assert [r["privacy_epsilon"] for r in rows] == sorted(r["privacy_epsilon"] for r in rows)
    summary = json.loads((tmp_path / "private" / "summary.json").read_text())
    assert summary["epsilon"] == rows[-1]["privacy_epsilon"] and summary["delta"] == 1e-5
