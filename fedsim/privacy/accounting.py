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
from collections.abc import Mapping
from typing import Any, ClassVar

from opacus.accountants import PRVAccountant as OpacusPRVAccountant
from opacus.accountants import RDPAccountant as OpacusRDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier


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
        self._history: list[tuple[float, float, int]] = []  # (z, q, steps), merged runs

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` rounds of noise multiplier z at sample rate q."""
        _check_step(noise_multiplier, sample_rate, num_steps)
        if self._history and self._history[-1][:2] == (noise_multiplier, sample_rate):
            num_steps += self._history.pop()[2]
        self._history.append((noise_multiplier, sample_rate, num_steps))

    def epsilon(self, delta: float) -> float:
        """Return the epsilon spent so far at ``delta``: 0 before any step, inf without noise."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        if not self._history:
            return 0.0
        if any(z == 0 for z, _, _ in self._history):
            return math.inf
        return self._epsilon(delta)

    @abstractmethod
    def _epsilon(self, delta: float) -> float:
        """Epsilon of the non-empty, noisy history at a valid ``delta``."""

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
    """RDP accountant at Opacus's default orders (the spec's reference values use them)."""

    mechanism = "rdp"
    orders: ClassVar[tuple[float, ...]] = tuple(OpacusRDPAccountant.DEFAULT_ALPHAS)

    def _epsilon(self, delta: float) -> float:
        rdp = sum(
            rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=n, orders=list(self.orders))
            for z, q, n in self._history
        )
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(self.orders), rdp=rdp, delta=delta)
        return float(eps)


class PrvAccountant(Accountant):
    """PRV accountant: tighter than RDP; reports Opacus's upper bound (error 0.01)."""

    mechanism = "prv"

    def _epsilon(self, delta: float) -> float:
        opacus = OpacusPRVAccountant()
        opacus.history = list(self._history)
        return float(opacus.get_epsilon(delta))


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
        if population < 1:
            raise ValueError(f"population must be >= 1, got {population}")
        self.population = population

    def _epsilon(self, delta: float) -> float:
        try:
            import dp_accounting
            from dp_accounting.rdp import rdp_privacy_accountant
        except ImportError:
            raise ImportError(
                "fixed-size cohorts are accounted with dp-accounting, which pins an old attrs: "
                "pip install --no-deps dp-accounting==0.5.1 dm-tree absl-py (make does this)"
            ) from None

        accountant = rdp_privacy_accountant.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
        )
        for z, q, n in self._history:
            sampled = dp_accounting.SampledWithoutReplacementDpEvent(
                self.population, round(q * self.population), dp_accounting.GaussianDpEvent(z)
            )
            accountant.compose(dp_accounting.SelfComposedDpEvent(sampled, n))
        return float(accountant.get_epsilon(delta))


ACCOUNTANTS: Mapping[str, type[Accountant]] = {
    accountant.mechanism: accountant for accountant in (RdpAccountant, PrvAccountant)
}


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

    Opacus's bisection: the returned z spends between ``target_epsilon -
    epsilon_tolerance`` and ``target_epsilon``.
    """
    if mechanism not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {mechanism!r}; known: {sorted(ACCOUNTANTS)}")
    if not (target_epsilon > 0 and 0 < delta < 1 and epsilon_tolerance > 0):
        raise ValueError(
            f"need target_epsilon > 0, 0 < delta < 1 and epsilon_tolerance > 0, got "
            f"{target_epsilon}, {delta}, {epsilon_tolerance}"
        )
    _check_step(1.0, sample_rate, num_steps)
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=num_steps,
            accountant=mechanism,
            epsilon_tolerance=epsilon_tolerance,
        )
    )


def _check_step(noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
    """Raise a one-line ValueError for a step no accountant can compose."""
    if not noise_multiplier >= 0:
        raise ValueError(f"noise multiplier must be non-negative, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must lie in (0, 1], got {sample_rate}")
    if not (isinstance(num_steps, numbers.Integral) and num_steps >= 1):
        raise ValueError(f"number of steps must be a positive integer, got {num_steps}")
