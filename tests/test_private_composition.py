"""Apple's stack composed: local privatization -> secure aggregation -> central DP on the sum.

Ten clients (tests/test_secagg.py's MLP and partitions, node ids 2..11). Under
central DP every client has weight 1 and W = 1, so the field has
L = ⌊(2^31 - 1)/|U2|⌋ levels of c = S; comparisons allow the error bound that
follows from it (sum_error) plus float32 rounding of the model.
"""

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedsim import keys
from fedsim.arrays import arrays_of, to_array_record
from fedsim.clients import make_client_app
from fedsim.clients.private_update import LDP_EPSILON, SeparatedPrivatization, norm_bound
from fedsim.clients.private_update import separated_privatization_mod as privatize
from fedsim.clients.secagg_mod import SecAggClient, secure_client_app
from fedsim.engine import InlineGrid
from fedsim.loop import RoundReport, run_rounds
from fedsim.privacy.accounting import FixedSizeRdpAccountant, RdpAccountant
from fedsim.privacy.clipping import clip_l2
from fedsim.privacy.flat import flatten
from fedsim.privacy.secagg import wire
from fedsim.privacy.secagg.quantization import FieldQuantizer, levels_for
from fedsim.records import records_of
from fedsim.strategies import CentralDP, FedAvg
from fedsim.strategies.gaussian_sum_release import COHORT_METRIC, GaussianSumRelease
from fedsim.strategies.secure_central_dp import SecureCentralDP
from tests.test_secagg import (
    FIRST_NODE,
    FLOAT32_SLACK,
    TASK,
    N,
    ServerView,
    assert_uniform_mod_2_32,
    everyone,
    initial_arrays,
    recording_app,
    seeded_secrets,  # noqa: F401 - a fixture, used by name
)

CLIP = 0.2  # S: the MLP's one-epoch updates have norms 0.11 to 0.41, so most are clipped
DIM = 20 * 64 + 64 + 64 * 3 + 3  # the MLP's parameters


def secure_dp(release: GaussianSumRelease) -> SecureCentralDP:
    return SecureCentralDP(FedAvg(**everyone()), release=release)


def release_for(
    noise_multiplier: float,
    *,
    cohort: int = N,
    sampling: str = "fixed",
    clip: float = CLIP,
    seed: int = 7,
) -> GaussianSumRelease:
    return GaussianSumRelease(
        noise_multiplier=noise_multiplier,
        clip_norm=clip,
        expected_cohort_size=cohort,
        sampling=sampling,  # type: ignore[arg-type]
        seed=seed,
    )


def run(strategy, grid: InlineGrid, initial: ArrayRecord, rounds: int = 1):
    """Run ``rounds`` rounds; return the final arrays and the rounds' reports."""
    reports: list[RoundReport] = []

    class Keep:
        def on_round(self, report: RoundReport) -> None:
            reports.append(report)

    final = run_rounds(
        strategy=strategy,
        grid=grid,
        initial_arrays=initial,
        num_rounds=rounds,
        train_config=ConfigRecord({keys.SEED: 0}),
        observers=[Keep()],
    )
    return arrays_of(final), reports[1:]


def clipped_sum(updates: Iterable[np.ndarray]) -> np.ndarray:
    return sum(clip_l2(update, CLIP)[0] for update in updates)


def updates_of(trained: dict[int, dict[str, np.ndarray]]) -> dict[int, np.ndarray]:
    start, _ = flatten(arrays_of(initial_arrays()))
    return {node: flatten(model)[0] - start for node, model in trained.items()}


def sum_error(contributions: int) -> float:
    """Bound on a coordinate of the secure sum's error against the sum clipped at S.

    Rounding: below S/L per contribution, L = levels_for(|U2| = N, 1). Clipping:
    clients clip to r = S - √d·S/L (so the quantized contribution stays within
    S), which moves a coordinate by at most S - r = √d·S/L.
    """
    return contributions * (1 + np.sqrt(DIM)) * CLIP / levels_for(N, 1)


def mean_error(contributions: int) -> float:
    """The same on the model: the sum / C̄ = N, then rounded to float32."""
    return sum_error(contributions) / N + FLOAT32_SLACK


# ------------------------------------------------------- (a) z = 0: the clipped mean


def test_without_noise_the_result_is_the_unweighted_clipped_mean() -> None:
    trained: dict[int, dict[str, np.ndarray]] = {}
    secure, reports = run(
        secure_dp(release_for(0.0)),
        InlineGrid(recording_app(trained), num_nodes=N),
        initial_arrays(),
    )
    plain, plain_reports = run(
        CentralDP(
            FedAvg(**everyone()),
            noise_multiplier=0.0,
            clip_norm=CLIP,
            expected_cohort_size=N,
            sampling="fixed",
        ),
        InlineGrid(make_client_app(TASK), num_nodes=N),
        initial_arrays(),
    )

    updates = updates_of(trained)
    norms = [np.linalg.norm(update) for update in updates.values()]
    assert min(norms) < CLIP < max(norms)  # some clients are clipped, some not
    start, _ = flatten(arrays_of(initial_arrays()))
    expected = start + clipped_sum(updates.values()) / N
    error = np.max(np.abs(flatten(secure)[0] - expected))
    assert error <= mean_error(N)
    # The same as CentralDP clipping on the server, whose reference is exact.
    assert np.max(np.abs(flatten(secure)[0] - flatten(plain)[0])) <= mean_error(N)
    assert reports[0].train[COHORT_METRIC] == plain_reports[0].train[COHORT_METRIC] == N
    assert reports[0].exchanges == 4


# ----------------------------------------- (b) noise std zS/C̄, ε as the accountant's


def zero_update_app() -> ClientApp:
    """A secure app whose clients return the global model unchanged (a zero update)."""
    training = ClientApp()

    @training.train()
    def train(message: Message, context: Context) -> Message:
        content = RecordDict(
            {
                keys.ARRAYS: message.content[keys.ARRAYS],
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 1}),
            }
        )
        return Message(content, reply_to=message)

    app = ClientApp()
    SecAggClient(training).register(app)
    return app


def zeros(dim: int) -> ArrayRecord:
    return to_array_record({"w": np.zeros(dim)})


def test_noise_on_the_average_is_z_s_over_the_expected_cohort() -> None:
    z, clip, cohort, dim = 1.3, 0.7, 8, 200_000
    # Seed 6 draws a Poisson cohort of 7: dividing by it, not C̄ = 8, would be 14% off.
    release = release_for(z, cohort=cohort, sampling="poisson", clip=clip, seed=6)
    strategy = secure_dp(release)
    final, reports = run(strategy, InlineGrid(zero_update_app(), num_nodes=N), zeros(dim))

    # Zero updates quantize to exactly 0, so the model is the noise / C̄, std zS/C̄.
    # The sample std of d normals has relative standard error 1/√(2d) = 0.16% at
    # d = 2·10^5 (Var s² = 2σ⁴/(d - 1)); 1% is over 6 standard errors.
    noise = final["w"]
    assert np.std(noise) == pytest.approx(z * clip / cohort, rel=0.01)
    assert abs(np.mean(noise)) < 5 * z * clip / cohort / np.sqrt(dim)
    assert reports[0].train[COHORT_METRIC] == 7
    expected = RdpAccountant()
    expected.step(noise_multiplier=z, sample_rate=cohort / N)
    assert reports[0].privacy == {"epsilon": expected.epsilon(1e-5), "delta": 1e-5}


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_epsilon_is_reported_every_round_as_the_accountant_computes_it(sampling: str) -> None:
    z, cohort, rounds = 1.1, 6, 3
    strategy = secure_dp(release_for(z, cohort=cohort, sampling=sampling))
    _, reports = run(strategy, InlineGrid(zero_update_app(), num_nodes=N), zeros(3), rounds)
    expected = RdpAccountant() if sampling == "poisson" else FixedSizeRdpAccountant(N)
    for report in reports:
        assert report.train[COHORT_METRIC] >= 2  # every round released
        expected.step(noise_multiplier=z, sample_rate=cohort / N)
        assert report.privacy["epsilon"] == pytest.approx(expected.epsilon(1e-5), rel=1e-12)


# ------------------------------------------------------------- (c) 20% dropouts


@pytest.mark.parametrize(
    ("stage", "contributions"),
    [(wire.MASKED_INPUT, N - 2), (wire.UNMASK, N)],
    ids=["drop-before-masked-input", "drop-after-masked-input"],
)
def test_twenty_percent_dropouts_still_divide_by_the_expected_cohort(
    stage: str, contributions: int
) -> None:
    trained: dict[int, dict[str, np.ndarray]] = {}
    grid = ServerView(recording_app(trained), drop={stage: {FIRST_NODE + 3, FIRST_NODE + 8}})
    final, reports = run(secure_dp(release_for(0.0)), grid, initial_arrays())

    # Dropped before masking: 8 updates in the sum; after: all 10, masks rebuilt.
    assert len(trained) == reports[0].train[COHORT_METRIC] == contributions
    assert reports[0].train[wire.DROPPED_METRIC] == N - contributions
    start, _ = flatten(arrays_of(initial_arrays()))
    expected = start + clipped_sum(updates_of(trained).values()) / N  # / C̄ = 10, not 8
    assert np.max(np.abs(flatten(final)[0] - expected)) <= mean_error(contributions)


# ------------------------------------- (d) local privatization + secure + central


def recording_mod(private: dict[int, np.ndarray], epsilons: list[float]) -> Mod:
    """Record each client's privatized update and its reported local ε (outermost mod)."""

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        start, _ = flatten(arrays_of(message.content[keys.ARRAYS]))
        end, _ = flatten(arrays_of(reply.content[keys.ARRAYS]))
        private[message.metadata.dst_node_id] = end - start
        epsilons.append(float(reply.content[keys.METRICS][LDP_EPSILON]))  # type: ignore[arg-type]
        return reply

    return mod


class SpyRelease(GaussianSumRelease):
    """Keeps the unmasked sum it is handed, which the server never sees per client."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sums: list[np.ndarray] = []

    def release(self, total: np.ndarray, **kwargs) -> np.ndarray:  # type: ignore[override]
        self.sums.append(total.copy())
        return super().release(total, **kwargs)


@pytest.mark.usefixtures("seeded_secrets")
def test_local_privatization_under_secure_aggregation_and_central_dp() -> None:
    settings = SeparatedPrivatization(
        epsilon_direction=8.0, epsilon_magnitude=4.0, clip_radius=1.0, levels=8
    )
    private: dict[int, np.ndarray] = {}
    epsilons: list[float] = []
    app = secure_client_app(TASK, mods=[recording_mod(private, epsilons), privatize(settings)])
    grid = ServerView(app, drop={wire.MASKED_INPUT: {FIRST_NODE + 5}})
    z = 1.0
    release = SpyRelease(
        noise_multiplier=z, clip_norm=CLIP, expected_cohort_size=N, sampling="fixed", seed=7
    )
    final, reports = run(secure_dp(release), grid, initial_arrays())

    # The server holds masked uint32 vectors and shares; nothing else, no metrics.
    masked = {}
    for kind, reply in grid.replies:
        if reply.has_error():
            continue
        assert not records_of(reply.content, MetricRecord)
        if kind == wire.MASKED_INPUT:
            assert list(reply.content) == [wire.MASKED]
            vectors = arrays_of(reply.content[wire.MASKED])
            masked[reply.metadata.src_node_id] = vectors[wire.MASKED_VECTOR]
        else:
            assert not records_of(reply.content, ArrayRecord)
    assert sorted(masked) == sorted(private) and len(masked) == N - 1
    for vector in masked.values():
        assert vector.dtype == np.uint32 and vector.shape == (DIM + 1,)
        assert_uniform_mod_2_32(vector)

    # What was masked is the privatized update (norm |R̂|/m, far beyond S), then clipped.
    assert epsilons == [12.0] * (N - 1)
    bound = norm_bound(settings, DIM) * (1 + 1e-9)
    assert all(CLIP < np.linalg.norm(update) <= bound for update in private.values())
    (total,) = release.sums
    expected_sum = clipped_sum(private.values())
    assert np.max(np.abs(total - expected_sum)) <= sum_error(N - 1)

    assert all(np.all(np.isfinite(value)) for value in final.values())
    expected = FixedSizeRdpAccountant(N)
    expected.step(noise_multiplier=z, sample_rate=1.0)
    assert reports[0].privacy == {"epsilon": expected.epsilon(1e-5), "delta": 1e-5}
    assert reports[0].train[COHORT_METRIC] == N - 1


# ------------------------------------------------------------------ pure parts


def test_clipping_to_the_safe_radius_keeps_every_quantized_contribution_within_s() -> None:
    dim, clip = 1000, 1.0
    quantizer = FieldQuantizer(clip_range=clip, levels=50, max_weight=1)  # coarse: step 0.02
    radius = quantizer.safe_l2_radius(clip, dim)
    assert radius == pytest.approx(clip - np.sqrt(dim) * clip / 50)
    rng = np.random.default_rng(0)

    def largest_decoded_norm(norm: float) -> float:
        """Largest norm, over 200 random directions, of a vector of ``norm`` once quantized."""
        largest = 0.0
        for _ in range(200):
            direction = rng.standard_normal(dim)
            encoded = quantizer.encode(direction * (norm / np.linalg.norm(direction)), 1, rng)
            largest = max(largest, float(np.linalg.norm(quantizer.decode_sum(encoded)[0])))
        return largest

    assert largest_decoded_norm(radius) <= clip
    assert largest_decoded_norm(clip) > clip  # without the margin, rounding does exceed S
    with pytest.raises(ValueError, match="can round past norm"):
        quantizer.safe_l2_radius(clip, 50**2)


def test_release_is_seeded_per_round_and_its_state_round_trips() -> None:
    def fresh(seed: int = 7) -> GaussianSumRelease:
        return GaussianSumRelease(
            noise_multiplier=1.0, clip_norm=1.0, expected_cohort_size=5, seed=seed
        )

    first, again, other = fresh(), fresh(), fresh(seed=8)
    noise = [r.release(np.zeros(100), server_round=3, population=50) for r in (first, again, other)]
    np.testing.assert_array_equal(noise[0], noise[1])
    assert not np.array_equal(noise[0], noise[2])
    assert first.cohort(3, range(50)) == again.cohort(3, range(50)) != first.cohort(4, range(50))

    restored = fresh()
    restored.load_state_dict(first.state_dict())
    assert restored.privacy() == first.privacy() and restored.privacy()["epsilon"] > 0
