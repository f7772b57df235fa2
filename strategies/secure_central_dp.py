"""Central DP on top of secure aggregation: clients clip, the server noises only the sum.

Apple's private federated learning stack (Apple, WWDC 2019 "Designing for Privacy";
pfl-research) and DP-FedAvg under secure aggregation (McMahan et al. 2018,
arXiv:1710.06963) with secure aggregation (Bonawitz et al., CCS 2017).
The server never sees an individual update, so what :class:`CentralDP` does to
each reply moves to the client, and what it does to the sum stays on the server:

1. the cohort is drawn by the release (:class:`GaussianSumRelease`): Poisson at
   rate C̄/N or a fixed size C̄, as its accountant assumes;
2. :class:`SecureAggregation`'s four exchanges run with that cohort; each client
   trains (through its client mods, e.g. Bhowmick et al.'s PrivUnit2 + ScalarDP
   local privatization), clips its update in L2 norm so that even after
   quantization its contribution stays within S, and masks it with weight 1;
3. the server unmasks only the sum of the contributions, adds N(0, (zS)² I) and
   divides by the EXPECTED cohort C̄, however many clients survived;
4. the wrapped strategy steps from that noisy mean as one reply, and the
   accountant composes the round; ε at δ is reported every round.

Trust: the noise is added by the server after unmasking, so the guarantee is
towards everything downstream of the aggregate (the released models, other
clients, analysts), as in Apple's and Google's deployments; the server itself is
held to the sum by secure aggregation, and to the clipped, locally privatized
contributions by the clients. A round that stops before unmasking (too many
dropouts) releases nothing and spends no budget.

Quantization: with c = S and W = 1 the field holds L = ⌊(2^31 - 1)/n⌋ levels; the
decoded sum differs from the sum of the clipped updates by less than n·S/L per
coordinate, i.e. n·S/(L·C̄) on the mean, far below the noise zS/C̄ unless z ≈ 0.
Adaptive clipping is not available: it needs each client's clipped-or-not bit,
which the server does not see.
"""

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.arrays import arrays_of
from fedsim.loop import TrainRound
from fedsim.privacy.flat import flatten, unflatten
from fedsim.privacy.secagg import wire
from fedsim.strategies.gaussian_sum_release import COHORT_METRIC, GaussianSumRelease
from fedsim.strategies.multi_exchange import WrapsStrategy
from fedsim.strategies.sampling import available_nodes
from fedsim.strategies.secure_aggregation import SecureSummation


class SecureCentralDP(WrapsStrategy):
    """Run ``strategy``'s training under secure aggregation with central DP on the sum.

    Parameters
    ----------
    strategy
        A one-exchange strategy whose ``aggregate_train`` is a weighted mean of
        the replies' models followed by a server step (FedAvg and its
        descendants); it supplies the training message and the server step, and
        runs federated evaluation. Its own cohort choice is not used.
    release
        The noise, clip norm S, expected cohort C̄, sampling and accountant.
    threshold_fraction
        Fraction of the sampled cohort that must answer every exchange.

    Example: Apple's stack, with ``task`` a :class:`fedsim.clients.TorchTask`::

        release = GaussianSumRelease(noise_multiplier=1.0, clip_norm=0.4, expected_cohort_size=50)
        strategy = SecureCentralDP(FedAvg(fraction_evaluate=0.0), release=release)
        privatize = separated_privatization_mod(SeparatedPrivatization(...))
        app = secure_client_app(task, mods=[privatize])

    Clients must run :func:`fedsim.clients.secagg_mod.secure_client_app`.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        release: GaussianSumRelease,
        threshold_fraction: float = 2 / 3,
    ) -> None:
        self.strategy = strategy
        # c = S: every coordinate of an update of L2 norm at most S is within [-S, S].
        self.summation = SecureSummation(
            clip_range=release.clip_norm, max_weight=1, threshold_fraction=threshold_fraction
        )
        self.release = release

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Sample; securely sum the clipped updates; noise, divide by C̄, account; step."""
        node_ids = available_nodes(grid, 1)
        cohort = self.release.cohort(server_round, node_ids)
        _, content = self.training_content(server_round, arrays, config, grid)
        start, layout = flatten(arrays_of(arrays))
        outcome = yield from self.summation.run(
            server_round,
            cohort,
            content,
            dim=layout.size,
            contribution={wire.L2_CLIP: self.release.clip_norm},
        )
        if outcome is None:
            return None, None
        total, contributions = outcome.quantizer.decode_sum(outcome.total)
        noisy_mean = self.release.release(
            total, server_round=server_round, population=len(node_ids)
        )
        new_arrays = self.step_inner(server_round, unflatten(start + noisy_mean, layout), 1)
        metrics = outcome.metrics()
        metrics[COHORT_METRIC] = contributions
        return new_arrays, metrics
