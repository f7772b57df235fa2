"""Privacy accounting for the Poisson-subsampled Gaussian mechanism over rounds.

An accountant records (noise multiplier z, sample rate q, steps) and converts the
composition to (epsilon, delta)-DP. The maths is Opacus's (``opacus.accountants``):

* :class:`RdpAccountant`: Renyi DP of the subsampled Gaussian (Mironov, Talwar &
  Zhang 2019, arXiv:1908.10530) at Opacus's default orders, converted with Balle
  et al. (2020)'s bound, as ``opacus.accountants.RDPAccountant`` does;
* :class:`PrvAccountant`: numerical composition of privacy loss random variables
  (Gopi, Lee & Wutschitz 2021, arXiv:2106.02848); like Opacus, it reports the
  upper end of its error bar (``eps_error`` = 0.01), so a guarantee, not an estimate.

* :class:`FixedSizeRdpAccountant`: cohorts of a fixed size drawn without
  replacement, which Opacus does not account, through dp-accounting.

The tests also use dp-accounting's PLD accountant (which Opacus lacks) as an
independent reference.
Each accountant is a thin stateful class over those pure functions and saves its
history as plain data (:meth:`Accountant.state_dict`) so that a run can resume.
"""

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from opacus.accountants import PRVAccountant as OpacusPRVAccountant
from opacus.accountants import RDPAccountant as OpacusRDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

History = list[tuple[float, float, int]]  # (noise multiplier z, sample rate q, steps)

_MAX_NOISE_MULTIPLIER = 1e6  # Opacus's MAX_SIGMA: a budget that needs more is refused
_BISECTION_STEPS = 100  # halvings of [0, z_high]: far past float precision


class Accountant(ABC):
    """Composition of Poisson-subsampled Gaussian steps, and its epsilon.

    Example, DP-FedAvg with 1% of clients per round::

        accountant = RdpAccountant()
        for _ in range(1000):
            accountant.step(noise_multiplier=1.0, sample_rate=0.01)
        accountant.epsilon(1e-5)  # 2.10137
    """

    mechanism: ClassVar[str]

    def __init__(self) -> None:
        self._history: History = []  # merged runs of equal (z, q)

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` rounds of noise multiplier z at sample rate q."""
        _check_step(noise_multiplier, sample_rate, num_steps)
        if self._history and self._history[-1][:2] == (noise_multiplier, sample_rate):
            num_steps += self._history.pop()[2]
        self._history.append((noise_multiplier, sample_rate, num_steps))

    def epsilon(self, delta: float) -> float:
        """Return the epsilon spent so far at ``delta``, a guarantee and never negative.

        Steps of infinite noise (z = inf) release nothing that depends on the data,
        so they cost 0 and are left out: Opacus's RDP and PRV would loop forever on
        them. A step without noise (z = 0) makes epsilon inf, a conservative
        answer: only delta could then hide a record that was sampled. Near delta = 1
        the conversions give negative epsilons (RDP's is -3.3 at delta = 0.999); a
        mechanism that is (eps, delta)-DP with eps < 0 is (0, delta)-DP, and epsilon
        is non-negative by convention, so 0 is reported instead.
        """
        _check_delta(delta)
        history = [entry for entry in self._history if entry[0] != math.inf]
        if not history:
            return 0.0
        if any(z == 0 for z, _, _ in history):
            return math.inf
        return max(0.0, self._epsilon(history, delta))

    @abstractmethod
    def _epsilon(self, history: History, delta: float) -> float:
        """Epsilon of a non-empty history of finite, positive z at a valid ``delta``."""

    def state_dict(self) -> dict[str, Any]:
        """Return the history as plain, JSON-ready data."""
        return {"mechanism": self.mechanism, "history": [list(entry) for entry in self._history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a history saved by :meth:`state_dict` of the same kind of accountant."""
        if state.get("mechanism") != self.mechanism:
            raise ValueError(
                f"cannot load a {state.get('mechanism')!r} state into {self.mechanism!r}"
            )
        history = [(float(z), float(q), int(n)) for z, q, n in state["history"]]
        for entry in history:
            _check_step(*entry)
        self._history = history


class RdpAccountant(Accountant):
    """RDP accountant at Opacus's default orders (the golden values in the tests use them)."""

    mechanism = "rdp"
    orders: ClassVar[tuple[float, ...]] = tuple(OpacusRDPAccountant.DEFAULT_ALPHAS)

    def _epsilon(self, history: History, delta: float) -> float:
        return rdp_epsilon(history, delta, orders=self.orders)


class PrvAccountant(Accountant):
    """PRV accountant: tighter than RDP; reports Opacus's upper bound (error 0.01).

    Near delta = 1 the PRV's truncated grid may hold no epsilon that meets delta
    (Opacus raises "Cannot compute epsilon", at delta = 0.999 even where the true
    epsilon is in the hundreds); RDP's epsilon, also a guarantee, is reported then.
    """

    mechanism = "prv"

    def _epsilon(self, history: History, delta: float) -> float:
        opacus = OpacusPRVAccountant()
        opacus.history = list(history)
        try:
            return float(opacus.get_epsilon(delta))
        except RuntimeError as error:
            if str(error) != "Cannot compute epsilon":
                raise
        return rdp_epsilon(history, delta, orders=RdpAccountant.orders)


class FixedSizeRdpAccountant(Accountant):
    """RDP of a Gaussian on a cohort of fixed size drawn WITHOUT replacement.

    Opacus only accounts Poisson sampling; for a fixed cohort of m out of N nodes
    this uses dp-accounting's ``SampledWithoutReplacementDpEvent`` (Wang, Balle &
    Kasiviswanathan 2019), whose neighbouring relation is *replace one* (a node's
    data swapped, not added or removed): the epsilon is not comparable one to one
    with the Poisson (add/remove) accountants. ``sample_rate`` is m / N.
    """

    mechanism = "rdp-fixed-size"

    def __init__(self, population: int) -> None:
        super().__init__()
        if not _is_count(population):
            raise ValueError(f"population must be an integer >= 1, got {population!r}")
        self.population = population

    def _epsilon(self, history: History, delta: float) -> float:
        import dp_accounting  # imported here: most runs never account a fixed-size cohort
        from dp_accounting.rdp import rdp_privacy_accountant

        accountant = rdp_privacy_accountant.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
        )
        for z, q, n in history:
            sampled = dp_accounting.SampledWithoutReplacementDpEvent(
                self.population, round(q * self.population), dp_accounting.GaussianDpEvent(z)
            )
            accountant.compose(dp_accounting.SelfComposedDpEvent(sampled, n))
        return float(accountant.get_epsilon(delta))


ACCOUNTANTS: Mapping[str, type[Accountant]] = {
    accountant.mechanism: accountant for accountant in (RdpAccountant, PrvAccountant)
}


def rdp_epsilon(history: History, delta: float, *, orders: Sequence[float]) -> float:
    """Epsilon of ``history`` (finite, positive z) at ``delta``: RDP at ``orders``, Balle et al."""
    rdp = sum(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=n, orders=list(orders))
        for z, q, n in history
    )
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    num_steps: int,
    mechanism: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Return the smallest z (to bisection precision) with epsilon <= ``target_epsilon``.

    Opacus's bisection (``get_noise_multiplier``): the returned z spends between
    ``target_epsilon - epsilon_tolerance`` and ``target_epsilon``. It runs on
    these accountants rather than Opacus's, so that it answers near delta = 1 as
    they do (Opacus's PRV raises there). Near delta = 1 PRV's epsilon is not
    monotone in z (it answers 0 for some z and falls back to RDP's looser bound
    for others), so no z may land within the tolerance: the bisection stops after
    a fixed number of halvings, and the z it returns still meets the target.
    """
    if mechanism not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {mechanism!r}; known: {sorted(ACCOUNTANTS)}")
    if not 0 < target_epsilon < math.inf:
        raise ValueError(f"target_epsilon must lie in (0, inf), got {target_epsilon}")
    if not 0 < epsilon_tolerance < math.inf:
        raise ValueError(f"epsilon_tolerance must lie in (0, inf), got {epsilon_tolerance}")
    _check_delta(delta)
    _check_step(1.0, sample_rate, num_steps)

    def spent(noise_multiplier: float) -> float:
        accountant = ACCOUNTANTS[mechanism]()
        accountant.step(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=num_steps
        )
        return accountant.epsilon(delta)

    low, high, high_epsilon = 0.0, 10.0, math.inf
    while high_epsilon > target_epsilon:
        high *= 2
        if high > _MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"target_epsilon={target_epsilon} needs a noise multiplier above "
                f"{_MAX_NOISE_MULTIPLIER:g}"
            )
        high_epsilon = spent(high)
    for _ in range(_BISECTION_STEPS):
        if target_epsilon - high_epsilon <= epsilon_tolerance:
            break
        middle = (low + high) / 2
        middle_epsilon = spent(middle)
        if middle_epsilon < target_epsilon:
            high, high_epsilon = middle, middle_epsilon
        else:
            low = middle
    return high


def _is_count(value: object) -> bool:
    """Whether ``value`` is an integer >= 1 (a bool is not a count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1


def _check_delta(delta: float) -> None:
    """Raise a one-line ValueError for a delta that is no probability of failure."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")


def _check_step(noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
    """Raise a one-line ValueError for a step no accountant can compose (z = inf is allowed)."""
    if not noise_multiplier >= 0:  # NaN fails too
        raise ValueError(f"noise multiplier must lie in [0, inf], got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must lie in (0, 1], got {sample_rate}")
    if not _is_count(num_steps):
        raise ValueError(f"number of steps must be an integer >= 1, got {num_steps!r}")
