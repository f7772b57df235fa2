"""GS-WGAN's privacy, accounted two ways: the paper's, and the joint one that is the guarantee.

One GS-WGAN iteration samples a discriminator (a client) with probability q and
releases B sanitized image gradients, each clipped to C/B with N(0, (2 C sigma / B)^2)
noise per coordinate (:mod:`fedsim.privacy.gradient_sanitizer`).

(a) **The paper's accounting** (Chen, Orekondy & Fritz, NeurIPS 2020) counts each
    of the B gradients as its own subsampled Gaussian query (rate q, noise
    multiplier sigma), composed iterations x B times, with the authors' accountant
    (autodp's RDP of the Gaussian subsampled *without replacement*, Wang, Balle &
    Kasiviswanathan 2019). For sigma = 1.07, q = 1/1000, 20,000 iterations, B = 32
    and delta = 1e-5 it gives epsilon = 9.99 (Opacus's Poisson RDP: 4.45).
(b) **The joint accounting.** All B gradients come from the same discriminator,
    and one record of its data changes that discriminator and hence every one of
    the B gradients, each by up to 2C/B. Together they are one Gaussian query of
    L2 sensitivity sqrt(B) 2C/B under noise 2 C sigma / B per coordinate, i.e.
    noise multiplier sigma / sqrt(B), subsampled once per iteration (rate q).
    Opacus's Poisson RDP accountant gives epsilon = 366 for the setting above.

Counting B independently subsampled queries treats the B gradients as if each
came from a separately sampled record, which they do not: (a) is not a guarantee
unless a derivation shows it, and fedsim reports (b) as the guarantee beside it.
"""

import math
import warnings
from dataclasses import dataclass

from fedsim.privacy.accounting import RdpAccountant, rdp_epsilon


@dataclass(frozen=True)
class GSWGANAccounting:
    """Both epsilons of a GS-WGAN run after a number of iterations.

    ``sampling_rate`` is q = m / (number of clients), m the clients (discriminators)
    sampled per iteration; ``batch_size`` is B, the generated images per iteration.
    """

    noise_multiplier: float
    sampling_rate: float
    batch_size: int
    delta: float

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    @property
    def joint_noise_multiplier(self) -> float:
        """Return sigma / sqrt(B), the multiplier of the B gradients taken as one query."""
        return self.noise_multiplier / math.sqrt(self.batch_size)

    def paper_epsilon(self, iterations: int) -> float:
        """Return (a): iterations x B subsampled Gaussians (rate q, multiplier sigma), autodp."""
        if iterations == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        from autodp import rdp_acct, rdp_bank  # the authors' accountant, as their code calls it

        accountant = rdp_acct.anaRDPacct()
        sigma = self.noise_multiplier
        accountant.compose_subsampled_mechanism(
            lambda order: rdp_bank.RDP_gaussian({"sigma": sigma}, order),
            self.sampling_rate,
            coeff=iterations * self.batch_size,
        )
        return max(0.0, float(accountant.get_eps(self.delta)))

    def joint_epsilon(self, iterations: int) -> float:
        """Return (b): iterations subsampled Gaussians (rate q, sigma/sqrt(B)), Opacus's RDP.

        At small multipliers the best of Opacus's orders is its smallest (1.1), and
        Opacus warns that lower orders could tighten the bound; the value is still a
        guarantee, so the warning is silenced.
        """
        if iterations == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        history = [(self.joint_noise_multiplier, self.sampling_rate, iterations)]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
            return max(0.0, rdp_epsilon(history, self.delta, orders=RdpAccountant.orders))

    def epsilons(self, iterations: int) -> dict[str, float]:
        """Return both, named as the run's metrics report them."""
        return {
            "epsilon_paper": self.paper_epsilon(iterations),
            "epsilon_joint": self.joint_epsilon(iterations),
            "delta": self.delta,
        }
