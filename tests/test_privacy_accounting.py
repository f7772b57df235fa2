"""Accountants: golden epsilons (Opacus, dp-accounting), calibration, checkpoints."""

import json

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import RDPAccountant as OpacusRDPAccountant

from fedsim.privacy.accounting import (
    ACCOUNTANTS,
    PrvAccountant,
    RdpAccountant,
    calibrate_noise_multiplier,
)

# (q, z, steps, delta) -> epsilon, RDP at Opacus's default orders.
RDP_GOLDEN = [
    (0.04, 1.5, 2250, 1e-5, 7.32911),
    (0.01, 1.0, 1000, 1e-5, 2.10137),
    (0.001, 1.0, 10000, 1e-6, 0.97954),
    (0.01, 1.1, 10000, 1e-5, 5.6320),
    (0.01, 0.5, 100, 1e-5, 8.0307),
]

# Opacus 1.6.0 (and 1.4.0) PRV, eps_error 0.01, delta_error delta/1000: the upper end of
# [6.758431, 6.768781, 6.779132] (lower, estimate, upper); Microsoft's prv_accountant
# 0.2.0 gives the same triple and dp-accounting's PLD 6.768787. The spec's 6.7774 is
# none of these (see the report on the privacy issue), so this is the reproducible value.
PRV_GOLDEN = 6.779132


def _pld_epsilon(q: float, z: float, steps: int, delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("q", "z", "steps", "delta", "epsilon"), RDP_GOLDEN)
def test_rdp_accountant_golden_values(
    q: float, z: float, steps: int, delta: float, epsilon: float
) -> None:
    accountant = RdpAccountant()
    accountant.step(noise_multiplier=z, sample_rate=q, num_steps=steps)
    assert accountant.epsilon(delta) == pytest.approx(epsilon, abs=1e-4)


def test_prv_accountant_golden_value_and_the_pld_reference() -> None:
    accountant = PrvAccountant()
    accountant.step(noise_multiplier=1.5, sample_rate=0.04, num_steps=2250)
    epsilon = accountant.epsilon(1e-5)
    assert epsilon == pytest.approx(PRV_GOLDEN, abs=1e-4)
    # An independent accountant (dp-accounting's PLD) lies within PRV's error bar below
    # the reported upper bound, and RDP is looser than both.
    pld = _pld_epsilon(0.04, 1.5, 2250, 1e-5)
    assert pld <= epsilon <= pld + 0.011
    assert epsilon < 7.32911


def test_calibrated_noise_multiplier_reference_value() -> None:
    z = calibrate_noise_multiplier(target_epsilon=8, delta=1e-5, sample_rate=0.04, num_steps=2000)
    assert z == pytest.approx(1.3562, abs=1e-4)
    accountant = RdpAccountant()
    accountant.step(noise_multiplier=z, sample_rate=0.04, num_steps=2000)
    assert 8 - 0.01 <= accountant.epsilon(1e-5) <= 8


# Opacus bounds the PRV domain with RDP, which warns at the bisection's first, large z.
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_calibration_with_the_prv_accountant_meets_the_target() -> None:
    z = calibrate_noise_multiplier(
        target_epsilon=2, delta=1e-6, sample_rate=0.01, num_steps=500, mechanism="prv"
    )
    accountant = PrvAccountant()
    accountant.step(noise_multiplier=z, sample_rate=0.01, num_steps=500)
    assert 2 - 0.01 <= accountant.epsilon(1e-6) <= 2


def test_single_steps_merge_into_the_same_history_as_one_multi_step() -> None:
    one_by_one, at_once = RdpAccountant(), RdpAccountant()
    for _ in range(1000):
        one_by_one.step(noise_multiplier=1.0, sample_rate=0.01)
    at_once.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)
    assert one_by_one.state_dict() == at_once.state_dict()
    assert one_by_one.state_dict()["history"] == [[1.0, 0.01, 1000]]


def test_a_changing_schedule_composes_as_opacus_composes_it() -> None:
    ours, opacus = RdpAccountant(), OpacusRDPAccountant()
    for z, q, steps in [(1.0, 0.01, 300), (2.0, 0.02, 200), (1.0, 0.01, 100)]:
        ours.step(noise_multiplier=z, sample_rate=q, num_steps=steps)
        for _ in range(steps):
            opacus.step(noise_multiplier=z, sample_rate=q)
    assert len(ours.state_dict()["history"]) == 3
    assert ours.epsilon(1e-5) == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-12)


@pytest.mark.parametrize("mechanism", sorted(ACCOUNTANTS))
def test_state_round_trips_through_json(mechanism: str) -> None:
    accountant = ACCOUNTANTS[mechanism]()
    accountant.step(noise_multiplier=1.1, sample_rate=0.02, num_steps=150)
    accountant.step(noise_multiplier=0.9, sample_rate=0.02, num_steps=50)
    restored = ACCOUNTANTS[mechanism]()
    restored.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.state_dict() == accountant.state_dict()
    assert restored.epsilon(1e-5) == accountant.epsilon(1e-5)


def test_loading_another_accountants_state_is_refused() -> None:
    rdp = RdpAccountant()
    rdp.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="cannot load a 'rdp' state into 'prv'"):
        PrvAccountant().load_state_dict(rdp.state_dict())


@pytest.mark.parametrize("mechanism", sorted(ACCOUNTANTS))
def test_no_steps_spend_nothing_and_no_noise_spends_everything(mechanism: str) -> None:
    accountant = ACCOUNTANTS[mechanism]()
    assert accountant.epsilon(1e-5) == 0.0
    accountant.step(noise_multiplier=0.0, sample_rate=0.5)
    assert accountant.epsilon(1e-5) == float("inf")


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_delta_outside_the_open_unit_interval_is_refused(delta: float) -> None:
    with pytest.raises(ValueError, match=r"delta must lie in \(0, 1\)"):
        RdpAccountant().epsilon(delta)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"noise_multiplier": -0.5, "sample_rate": 0.1}, r"noise multiplier must lie in \[0"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.0}, r"sample rate must lie in \(0, 1\]"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5}, r"sample rate must lie in \(0, 1\]"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "num_steps": 0}, "integer >= 1"),
    ],
)
def test_bad_steps_are_refused_with_one_line(step: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        RdpAccountant().step(**step)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"delta": 1.0}, r"delta must lie in \(0, 1\)"),
        ({"sample_rate": 0.0}, "sample rate"),
        ({"mechanism": "gdp"}, "unknown accountant 'gdp'"),
    ],
)
def test_calibration_refuses_bad_inputs(arguments: dict, message: str) -> None:
    good = {"target_epsilon": 8.0, "delta": 1e-5, "sample_rate": 0.04, "num_steps": 2000}
    with pytest.raises(ValueError, match=message):
        calibrate_noise_multiplier(**(good | arguments))
