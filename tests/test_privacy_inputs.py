"""Privacy inputs at the edge: every bad value gets a one-line ValueError or a defined answer.

Issue 16, item 5. Infinite noise used to loop forever inside Opacus (hence the
timeouts), RDP gave negative epsilons near delta = 1, and NaN, Inf or overflowing
updates were privatized into NaN or zeros without a word.
"""

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim import keys
from fedsim.arrays import to_array_record
from fedsim.clients.private_update import SeparatedPrivatization, separated_privatization_mod
from fedsim.engine import InlineGrid
from fedsim.privacy.accounting import (
    Accountant,
    FixedSizeRdpAccountant,
    PrvAccountant,
    RdpAccountant,
    calibrate_noise_multiplier,
)
from fedsim.privacy.clipping import clip_l2, l2_norm
from fedsim.privacy.privunit import calibrate_privunit, privunit
from fedsim.privacy.scalar_dp import ScalarDPParams, scalar_dp, scalar_dp_moments
from fedsim.privacy.separated import privatize_separated

ACCOUNTANT_FACTORIES: dict[str, Callable[[], Accountant]] = {
    "rdp": RdpAccountant,
    "prv": PrvAccountant,
    "rdp-fixed-size": lambda: FixedSizeRdpAccountant(100),
}
NON_FINITE = [math.nan, math.inf, -math.inf]


@contextmanager
def raises_one_line(match: str) -> Iterator[None]:
    """Expect a ValueError matching ``match`` whose message is one line."""
    with pytest.raises(ValueError, match=match) as error:
        yield
    assert "\n" not in str(error.value)


# --- noise multiplier ------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", list(ACCOUNTANT_FACTORIES))
def test_infinite_noise_spends_nothing(name: str) -> None:
    accountant = ACCOUNTANT_FACTORIES[name]()
    accountant.step(noise_multiplier=math.inf, sample_rate=0.01, num_steps=100)
    assert accountant.epsilon(1e-5) == 0.0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(ACCOUNTANT_FACTORIES))
def test_infinite_noise_steps_add_nothing_to_finite_ones(name: str) -> None:
    mixed, finite = ACCOUNTANT_FACTORIES[name](), ACCOUNTANT_FACTORIES[name]()
    mixed.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=50)
    mixed.step(noise_multiplier=math.inf, sample_rate=0.1, num_steps=50)
    finite.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=50)
    assert mixed.epsilon(1e-5) == finite.epsilon(1e-5)


@pytest.mark.timeout(10)
def test_infinite_noise_survives_a_json_checkpoint() -> None:
    accountant = RdpAccountant()
    accountant.step(noise_multiplier=math.inf, sample_rate=0.5)
    restored = RdpAccountant()
    restored.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.epsilon(1e-5) == 0.0


@pytest.mark.parametrize("name", list(ACCOUNTANT_FACTORIES))
def test_no_noise_spends_everything_even_beside_infinite_noise(name: str) -> None:
    accountant = ACCOUNTANT_FACTORIES[name]()
    accountant.step(noise_multiplier=math.inf, sample_rate=0.01)
    accountant.step(noise_multiplier=0.0, sample_rate=0.01)
    assert accountant.epsilon(1e-5) == math.inf


@pytest.mark.parametrize("z", [math.nan, -math.inf, -1.0])
def test_nan_and_negative_noise_multipliers_are_refused(z: float) -> None:
    with raises_one_line(r"noise multiplier must lie in \[0, inf\], got"):
        RdpAccountant().step(noise_multiplier=z, sample_rate=0.1)
    with raises_one_line(r"noise multiplier must lie in \[0, inf\]"):
        RdpAccountant().load_state_dict({"mechanism": "rdp", "history": [[z, 0.1, 1]]})


@pytest.mark.parametrize("num_steps", [True, 2.5, 0])
def test_a_step_count_that_is_no_positive_integer_is_refused(num_steps: object) -> None:
    with raises_one_line("number of steps must be an integer >= 1"):
        RdpAccountant().step(noise_multiplier=1.0, sample_rate=0.1, num_steps=num_steps)


@pytest.mark.parametrize("population", [True, 2.5, 0, math.nan])
def test_a_population_that_is_no_positive_integer_is_refused(population: object) -> None:
    with raises_one_line("population must be an integer >= 1"):
        FixedSizeRdpAccountant(population)


# --- delta -----------------------------------------------------------------------------------

BAD_DELTAS = [0.0, 1.0, -1e-5, 2.0, math.nan, math.inf]


@pytest.mark.parametrize("name", list(ACCOUNTANT_FACTORIES))
@pytest.mark.parametrize("delta", BAD_DELTAS)
def test_every_accountant_refuses_delta_outside_the_open_unit_interval(
    name: str, delta: float
) -> None:
    accountant = ACCOUNTANT_FACTORIES[name]()
    accountant.step(noise_multiplier=1.0, sample_rate=0.1)
    with raises_one_line(r"delta must lie in \(0, 1\), got"):
        accountant.epsilon(delta)


@pytest.mark.parametrize("delta", BAD_DELTAS)
def test_calibration_refuses_delta_outside_the_open_unit_interval(delta: float) -> None:
    with raises_one_line(r"delta must lie in \(0, 1\), got"):
        calibrate_noise_multiplier(target_epsilon=1.0, delta=delta, sample_rate=0.01, num_steps=100)


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("target_epsilon", math.inf),  # Opacus's bisection returned z = 10 for it
        ("target_epsilon", math.nan),
        ("target_epsilon", 0.0),
        ("epsilon_tolerance", math.inf),
        ("epsilon_tolerance", math.nan),
    ],
)
def test_calibration_refuses_non_finite_targets(argument: str, value: float) -> None:
    good = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "num_steps": 100}
    with raises_one_line(rf"{argument} must lie in \(0, inf\), got"):
        calibrate_noise_multiplier(**(good | {argument: value}))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(ACCOUNTANT_FACTORIES))
@pytest.mark.parametrize("delta", [0.5, 0.9, 0.999])
def test_epsilon_near_delta_one_is_zero_not_negative(name: str, delta: float) -> None:
    # One step at z = 1, q = 0.01: the two outputs' distributions differ by far less than
    # 0.5 in total variation, so (0, delta)-DP holds; RDP's conversion gave -3.34 at 0.999.
    accountant = ACCOUNTANT_FACTORIES[name]()
    accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    assert accountant.epsilon(delta) == 0.0


@pytest.mark.timeout(30)
def test_prv_falls_back_to_rdp_where_its_grid_holds_no_epsilon() -> None:
    # Opacus's PRV raises "Cannot compute epsilon" here, yet epsilon is in the hundreds:
    # returning 0 would be a false guarantee; RDP's bound is a true one.
    prv, rdp = PrvAccountant(), RdpAccountant()
    for accountant in (prv, rdp):
        accountant.step(noise_multiplier=0.3, sample_rate=1.0, num_steps=100)
    assert prv.epsilon(0.999) == rdp.epsilon(0.999) == pytest.approx(607.77, abs=0.01)


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_calibration_near_delta_one_meets_the_target(mechanism: str) -> None:
    # Opacus's own bisection raised RuntimeError("Cannot compute epsilon") for PRV here.
    z = calibrate_noise_multiplier(
        target_epsilon=1.0, delta=0.99, sample_rate=1.0, num_steps=10, mechanism=mechanism
    )
    accountant = RdpAccountant() if mechanism == "rdp" else PrvAccountant()
    accountant.step(noise_multiplier=z, sample_rate=1.0, num_steps=10)
    assert 1.0 - 0.01 <= accountant.epsilon(0.99) <= 1.0


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_calibration_stops_where_epsilon_is_not_monotone_in_z() -> None:
    # At delta = 0.999 PRV answers 0 for some z and falls back to RDP's looser bound for
    # others, so no z lands within the tolerance: an unbounded bisection would never stop.
    z = calibrate_noise_multiplier(
        target_epsilon=1.0, delta=0.999, sample_rate=1.0, num_steps=10, mechanism="prv"
    )
    accountant = PrvAccountant()
    accountant.step(noise_multiplier=z, sample_rate=1.0, num_steps=10)
    assert accountant.epsilon(0.999) <= 1.0


def test_an_unreachable_target_is_refused() -> None:
    # RDP at Opacus's orders never goes below ~0.1 at delta = 1e-5, whatever z.
    with raises_one_line("needs a noise multiplier above 1e"):
        calibrate_noise_multiplier(target_epsilon=0.01, delta=1e-5, sample_rate=0.01, num_steps=100)


# --- updates given to the local randomizers --------------------------------------------------

DIRECTION = calibrate_privunit(epsilon=2.0, dim=4)
MAGNITUDE = ScalarDPParams(epsilon=1.0, levels=4, max_value=1.0)


def _separated(update: np.ndarray) -> np.ndarray:
    return privatize_separated(
        update, direction=DIRECTION, magnitude=MAGNITUDE, rng=np.random.default_rng(0)
    )


@pytest.mark.parametrize("bad", NON_FINITE)
def test_separated_privatizer_refuses_a_non_finite_update(bad: float) -> None:
    with raises_one_line("update must be finite, got NaN or Inf entries"):
        _separated(np.array([0.1, bad, 0.2, 0.3]))


@pytest.mark.parametrize("bad", NON_FINITE)
def test_privunit_refuses_a_non_finite_direction(bad: float) -> None:
    with raises_one_line("u must be finite, got NaN or Inf entries"):
        privunit(np.array([1.0, bad, 0.0, 0.0]), DIRECTION, np.random.default_rng(0))


@pytest.mark.parametrize("bad", NON_FINITE)
def test_scalar_dp_refuses_a_non_finite_magnitude(bad: float) -> None:
    with raises_one_line(rf"values must lie in \[0, 1.0\], got {bad}"):
        scalar_dp(np.array([0.5, bad]), MAGNITUDE, np.random.default_rng(0))


@pytest.mark.parametrize(
    "update",
    [
        np.full(4, 1e30, dtype=np.float32),  # squares overflow float32
        np.full(4, 1e200),  # squares overflow float64
        np.full(4, 1e-160),  # squares underflow: the unit vector was off by more than 1e-6
    ],
)
def test_separated_privatizer_clips_huge_and_tiny_updates(update: np.ndarray) -> None:
    output = _separated(update)
    # Every output is R_hat * Z: direction off by PrivUnit, norm |R_hat| / m.
    assert np.all(np.isfinite(output))
    magnitude = np.linalg.norm(output) / DIRECTION.inv_m
    assert np.isclose(magnitude, np.abs(MAGNITUDE.outputs()), atol=1e-9).any()


@pytest.mark.parametrize(
    ("vector", "norm"),
    [
        (np.array([3e30, 4e30], dtype=np.float32), 5e30),
        (np.array([3e200, -4e200]), 5e200),
        (np.array([3e-170, 4e-170]), 5e-170),
        (np.zeros(3), 0.0),
    ],
)
def test_l2_norm_neither_overflows_nor_underflows(vector: np.ndarray, norm: float) -> None:
    assert l2_norm(vector) == pytest.approx(norm, rel=1e-6)


def test_clip_l2_clips_a_huge_float32_vector_instead_of_zeroing_it() -> None:
    clipped, norm = clip_l2(np.array([3e30, 4e30], dtype=np.float32), 1.0)
    np.testing.assert_allclose(clipped, [0.6, 0.8], rtol=1e-6)
    assert norm == pytest.approx(5e30, rel=1e-6)


@pytest.mark.parametrize("bad", NON_FINITE)
def test_clip_l2_refuses_a_non_finite_vector(bad: float) -> None:
    with raises_one_line("vector must be finite"):
        clip_l2(np.array([1.0, bad]), 1.0)


def test_a_norm_beyond_the_largest_float_is_refused() -> None:
    with raises_one_line("update has an L2 norm above the largest float64"):
        _separated(np.full(4, 1e308))


# --- ScalarDP parameters ---------------------------------------------------------------------


@pytest.mark.parametrize("levels", [2.5, True, 0, -1, math.nan, "4"])
def test_scalar_dp_levels_must_be_a_positive_integer(levels: object) -> None:
    with raises_one_line("levels must be an integer >= 1, got"):
        ScalarDPParams(epsilon=1.0, levels=levels, max_value=1.0)


def test_scalar_dp_levels_may_be_a_numpy_integer() -> None:
    assert ScalarDPParams(epsilon=1.0, levels=np.int64(3), max_value=1.0).outputs().shape == (4,)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epsilon", math.nan, r"epsilon must lie in \(0, inf\]"),
        ("epsilon", 0.0, r"epsilon must lie in \(0, inf\]"),
        ("max_value", math.inf, r"max_value must lie in \(0, inf\)"),
        ("max_value", math.nan, r"max_value must lie in \(0, inf\)"),
    ],
)
def test_scalar_dp_budget_and_range_are_checked(field: str, value: float, message: str) -> None:
    good = {"epsilon": 1.0, "levels": 4, "max_value": 1.0}
    with raises_one_line(message):
        ScalarDPParams(**(good | {field: value}))


@pytest.mark.parametrize("value", [-0.1, 1.1, math.nan, math.inf])
def test_scalar_dp_moments_refuse_a_value_outside_the_range(value: float) -> None:
    with raises_one_line(r"value must lie in \[0, 1.0\], got"):
        scalar_dp_moments(value, MAGNITUDE)


# --- the client mod: a ValueError becomes an error reply, never a privatized reply --------


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_update_becomes_an_error_reply_not_noise(bad: float) -> None:
    settings = SeparatedPrivatization(epsilon_direction=2.0, epsilon_magnitude=1.0, clip_radius=1.0)
    app = ClientApp(mods=[separated_privatization_mod(settings)])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        trained = {"w": np.array([0.1, bad, 0.2, 0.3])}
        content = RecordDict({keys.ARRAYS: to_array_record(trained), keys.METRICS: MetricRecord()})
        return Message(content, reply_to=message)

    grid = InlineGrid(app, num_nodes=1)
    content = RecordDict(
        {
            keys.ARRAYS: to_array_record({"w": np.zeros(4)}),
            keys.CONFIG: ConfigRecord({keys.SEED: 0, keys.SERVER_ROUND: 1}),
        }
    )
    (reply,) = grid.send_and_receive([Message(content, grid.get_node_ids()[0], "train")])
    assert reply.has_error()
    assert "update must be finite, got NaN or Inf entries" in reply.error.reason
