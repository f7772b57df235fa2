"""Releasing a sum of L2-clipped contributions with Gaussian noise, and accounting for it.

DP-FedAvg's central mechanism (McMahan et al. 2018, arXiv:1710.06963), apart
from how the sum was formed:
:class:`fedsim.strategies.CentralDP` clips replies on the server and sums them,
:class:`fedsim.strategies.secure_central_dp.SecureCentralDP` has clients clip and
learns only the securely aggregated sum. Both need the same three things, which
must agree with one another, so they live together here:

* the cohort: Poisson sampling at rate q = C̄/N or a fixed size C̄ without
  replacement, because the accountant's amplification by subsampling assumes
  exactly the sampling that was done;
* the release: N(0, (zS)² I) added to the sum, divided by the EXPECTED cohort C̄
  (:func:`fedsim.privacy.central.noisy_average`);
* the accounting: one subsampled-Gaussian step per release, ε at δ on demand.

A sketch of one round (``node_ids`` the population, ``clip`` any L2 clipping)::

    release = GaussianSumRelease(noise_multiplier=1.0, clip_norm=0.5, expected_cohort_size=10)
    cohort = release.cohort(server_round, node_ids)
    total = sum(clip(update_of(node), 0.5) for node in cohort)
    noisy_mean = release.release(total, server_round=server_round, population=len(node_ids))
    release.privacy()  # {"epsilon": ..., "delta": 1e-05}

Both strategies hold one as ``release``; their base, ``WrapsStrategy``, reports its
privacy and checkpoints it with the wrapped strategy.
"""

from collections.abc import Sequence
from typing import Any, Final, Literal

import numpy as np

from fedsim.privacy.accounting import ACCOUNTANTS, Accountant, FixedSizeRdpAccountant
from fedsim.privacy.central import noisy_average
from fedsim.seeding import SERVER_NODE, numpy_rng
from fedsim.strategies.sampling import poisson_cohort, sample_cohort

Sampling = Literal["poisson", "fixed"]

# MetricRecord entry of a round's result: how many contributions the sum holds.
COHORT_METRIC: Final = "dp-cohort"


class GaussianSumRelease:
    """The cohort sampling, Gaussian noise and accountant of central DP, kept consistent.

    Parameters
    ----------
    noise_multiplier
        z; the noise std on the sum of clipped contributions is z·S.
    clip_norm
        S, the L2 bound on one contribution (the sum's sensitivity). Adaptive
        clipping may move it between rounds; it is saved with the state.
    expected_cohort_size
        C̄, clients per round (the Poisson rate is C̄/N).
    sampling
        ``"poisson"`` or ``"fixed"``.
    accountant
        ``"rdp"`` or ``"prv"`` (Poisson sampling); fixed-size cohorts always use
        the RDP accountant for sampling without replacement.
    delta
        δ of the reported ε.
    noise_cohort_size, accounting_population
        Calibrate noise and accounting for a deployment of C_n clients per round
        out of ``accounting_population`` (pfl-research's option).
    seed
        Seeds the cohort and noise draws, per round.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        expected_cohort_size: int,
        sampling: Sampling = "poisson",
        accountant: str = "rdp",
        delta: float = 1e-5,
        noise_cohort_size: int | None = None,
        accounting_population: int | None = None,
        seed: int = 0,
    ) -> None:
        if noise_multiplier < 0 or clip_norm <= 0 or expected_cohort_size < 1:
            raise ValueError(
                "central DP needs noise_multiplier >= 0, clip_norm > 0 and "
                f"expected_cohort_size >= 1; got {noise_multiplier}, {clip_norm}, "
                f"{expected_cohort_size}"
            )
        if sampling not in ("poisson", "fixed") or accountant not in ACCOUNTANTS:
            raise ValueError(
                f"sampling must be 'poisson' or 'fixed' and accountant one of "
                f"{sorted(ACCOUNTANTS)}; got {sampling!r}, {accountant!r}"
            )
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        self.noise_multiplier, self.clip_norm = noise_multiplier, clip_norm
        self.expected_cohort_size, self.sampling = expected_cohort_size, sampling
        self.accountant_name, self.delta, self.seed = accountant, delta, seed
        self.noise_cohort_size = noise_cohort_size
        self.accounting_population = accounting_population
        self.accountant: Accountant | None = None  # built on the first release (needs N)

    def cohort(self, server_round: int, node_ids: Sequence[int]) -> list[int]:
        """Draw the round's cohort the way the accountant assumes."""
        rng = numpy_rng(self.seed, server_round, SERVER_NODE, "central-dp-cohort")
        if self.sampling == "poisson":
            return poisson_cohort(node_ids, rate=self.expected_cohort_size / len(node_ids), rng=rng)
        return sample_cohort(node_ids, min(self.expected_cohort_size, len(node_ids)), rng)

    def release(
        self,
        total: np.ndarray,
        *,
        server_round: int,
        population: int,
        noise_multiplier: float | None = None,
    ) -> np.ndarray:
        """Return (``total`` + noise) / C̄ and record the round with the accountant.

        ``total`` must be a sum of contributions of L2 norm at most S over a
        cohort drawn by :meth:`cohort` from ``population`` nodes.
        ``noise_multiplier`` replaces z for this release's noise only: adaptive
        clipping's z_Δ, which with the noisy clip-norm query spends as much as
        one z-Gaussian, so the accountant still steps with z.
        """
        noisy_mean = noisy_average(
            total,
            noise_multiplier=self.noise_multiplier
            if noise_multiplier is None
            else noise_multiplier,
            clip_norm=self.clip_norm,
            expected_cohort_size=self.expected_cohort_size,
            rng=numpy_rng(self.seed, server_round, SERVER_NODE, "central-dp-noise"),
            noise_cohort_size=self.noise_cohort_size,
        )
        self._account(population)
        return noisy_mean

    def _account(self, population: int) -> None:
        accounting_population = self.accounting_population or population
        cohort = self.noise_cohort_size or self.expected_cohort_size
        if self.accountant is None:
            self.accountant = self._new_accountant(accounting_population)
        self.accountant.step(
            noise_multiplier=self.noise_multiplier,
            sample_rate=min(1.0, cohort / accounting_population),
        )

    def _new_accountant(self, population: int) -> Accountant:
        if self.sampling == "fixed":
            return FixedSizeRdpAccountant(population)
        return ACCOUNTANTS[self.accountant_name]()

    def privacy(self) -> dict[str, float]:
        """Return the ε spent so far at δ."""
        epsilon = self.accountant.epsilon(self.delta) if self.accountant else 0.0
        return {"epsilon": epsilon, "delta": self.delta}

    def state_dict(self) -> dict[str, Any]:
        """Return the accountant's history and the clip norm."""
        return {
            "accountant": self.accountant.state_dict() if self.accountant else None,
            "population": getattr(self.accountant, "population", None),
            "clip_norm": self.clip_norm,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.clip_norm = state["clip_norm"]
        if state["accountant"] is not None:
            self.accountant = self._new_accountant(state["population"])
            self.accountant.load_state_dict(state["accountant"])
