"""Central differential privacy around any one-exchange strategy (DP-FedAvg).

McMahan et al. 2018 (arXiv 1710.06963) with Andrew et al. 2021's adaptive
clipping (Andrew et al., NeurIPS 2021, arXiv 1905.03871). Per round:

1. the cohort is drawn by the wrapper, not the inner strategy, because the
   accountant must know how: Poisson sampling at rate q = C̄/N (Opacus's RDP or
   PRV accountant) or a fixed size C̄ without replacement (dp-accounting's RDP for
   sampling without replacement; replace-one neighbours);
2. each reply's update (its model minus the global model) is clipped to L2 norm
   S; the clipped updates are summed (one running float64 vector);
3. Gaussian noise N(0, (zS)² I) is added to the sum, which is divided by the
   EXPECTED cohort size C̄ (dividing by the realized count would make the
   sensitivity depend on who answered);
4. the inner strategy receives that noisy mean as one reply (the global model
   plus the noisy update, weight 1), so FedAvg's server step, FedAdam's or any
   other strategy's apply unchanged;
5. the accountant composes the round; ε at δ is reported every round.

Steps 1, 3 and 5 are :class:`~fedsim.strategies.gaussian_sum_release.GaussianSumRelease`'s,
shared with :class:`~fedsim.strategies.secure_central_dp.SecureCentralDP`, where
clients clip and the server sees only the securely aggregated sum.

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping``: it hands the
clipped replies to the inner strategy's *example-weighted* mean over the
*replies received*, so one client's contribution is bounded by S·w_i/Σw, not S/C̄
(Flower checks equal weights only when its accountant is on), and a round with
dropouts divides by fewer clients than the noise was calibrated for; its
accountant also assumes no sampling amplification. The clipping itself is the
same (``compute_clip_model_update`` clips the same way as ``clip_l2``).

Simulating a small cohort for a large deployment (Apple's pfl-research): with
``noise_cohort_size`` C_n the noise on the average is zS/C_n whatever the
simulated C̄, and ``accounting_population`` makes the accountant use
q = C_n / N_deployed: the simulated run then has the deployment's signal-to-noise
ratio and reports the deployment's ε.

Client metrics (loss) are averaged in the clear and are not covered by the
guarantee, as in Flower's wrappers.
"""

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim import keys
from fedsim.arrays import arrays_of
from fedsim.loop import TrainRound
from fedsim.privacy.adaptive_clipping import (
    indicator_noise_std,
    next_clip_norm,
    noisy_unclipped_fraction,
    update_noise_multiplier,
)
from fedsim.privacy.clipping import clip_l2
from fedsim.privacy.flat import FlatLayout, flatten, unflatten
from fedsim.records import records_of
from fedsim.seeding import SERVER_NODE, numpy_rng
from fedsim.strategies.aggregation import InvalidReplyError, finite_number, reply_arrays
from fedsim.strategies.fedavg import skip_reply
from fedsim.strategies.gaussian_sum_release import (
    COHORT_METRIC,
    GaussianSumRelease,
    Sampling,
)
from fedsim.strategies.multi_exchange import WrapsStrategy
from fedsim.strategies.sampling import available_nodes


class CentralDP(WrapsStrategy):
    """Wrap ``strategy`` in central DP with fixed or adaptive clipping.

    Parameters
    ----------
    strategy
        Any one-exchange Flower strategy; it supplies the training message and
        the server step, and runs federated evaluation.
    noise_multiplier, clip_norm, expected_cohort_size, sampling, accountant, delta,
    noise_cohort_size, accounting_population
        As for :class:`~fedsim.strategies.gaussian_sum_release.GaussianSumRelease`,
        which draws the cohort, adds the noise and keeps the accountant
        (``clip_norm`` is the initial C_0 with ``adaptive_clipping``).
    adaptive_clipping
        Track the median update norm (Andrew et al.); the updates' noise
        multiplier becomes z_Δ so the round stays as private as one z-Gaussian.
    seed
        Seeds cohort and noise draws, per round.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float,
        clip_norm: float,
        expected_cohort_size: int,
        sampling: Sampling = "poisson",
        accountant: str = "rdp",
        delta: float = 1e-5,
        adaptive_clipping: bool = False,
        noise_cohort_size: int | None = None,
        accounting_population: int | None = None,
        seed: int = 0,
    ) -> None:
        self.strategy = strategy
        self.release = GaussianSumRelease(
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            expected_cohort_size=expected_cohort_size,
            sampling=sampling,
            accountant=accountant,
            delta=delta,
            noise_cohort_size=noise_cohort_size,
            accounting_population=accounting_population,
            seed=seed,
        )
        self.adaptive_clipping = adaptive_clipping

    # --------------------------------------------------------------- a round

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Sample, collect, clip, sum, noise, account; let the inner strategy step."""
        node_ids = available_nodes(grid, 1)
        cohort = self.release.cohort(server_round, node_ids)
        instructions, content = self.training_content(server_round, arrays, config, grid)
        # The inner strategy's message type: a plug-in's own client action (FedProx's
        # train.prox) keeps running under the wrapper; FedAvg's is plain train.
        kind = instructions[0].metadata.message_type if instructions else MessageType.TRAIN
        replies = yield [Message(content, node, kind) for node in cohort]
        global_vector, layout = flatten(arrays_of(arrays))
        total, unclipped, losses, counted = self._sum_clipped(replies, global_vector, layout)

        clip_norm_used = self.release.clip_norm
        noisy_mean = self.release.release(
            total,
            server_round=server_round,
            population=len(node_ids),
            noise_multiplier=self._update_noise_multiplier(),
        )
        if self.adaptive_clipping:
            self._adapt_clip_norm(server_round, unclipped)

        new_arrays = self.step_inner(server_round, unflatten(global_vector + noisy_mean, layout), 1)
        metrics = MetricRecord({"dp-clip-norm": clip_norm_used, COHORT_METRIC: counted})
        if losses:
            metrics[keys.TRAIN_LOSS] = float(np.mean(losses))
        return new_arrays, metrics

    def _sum_clipped(
        self, replies: Iterable[Message], global_vector: np.ndarray, layout: FlatLayout
    ) -> tuple[np.ndarray, int, list[float], int]:
        """Return (sum of clipped updates, how many were within S, losses, replies counted)."""
        total = np.zeros_like(global_vector)
        unclipped, losses, counted = 0, [], 0
        for reply in replies:
            if reply.has_error():
                skip_reply(reply, reply.error.reason or f"error code {reply.error.code}")
                continue
            array_records = records_of(reply.content, ArrayRecord)
            if len(array_records) != 1:
                skip_reply(reply, f"expected one ArrayRecord, got {len(array_records)}")
                continue
            try:
                model, model_layout = flatten(reply_arrays(next(iter(array_records.values()))))
            except InvalidReplyError as exc:
                skip_reply(reply, str(exc))
                continue
            if model_layout != layout or not np.all(np.isfinite(model)):
                skip_reply(reply, "arrays differ from the model's, or are not finite")
                continue
            try:  # finite entries whose update's norm exceeds float64 have no norm to clip
                clipped, norm = clip_l2(model - global_vector, self.release.clip_norm)
            except ValueError as exc:
                skip_reply(reply, str(exc))
                continue
            total += clipped
            unclipped += norm <= self.release.clip_norm
            counted += 1
            metric_records = records_of(reply.content, MetricRecord)
            for record in metric_records.values():
                loss = record.get(keys.TRAIN_LOSS)
                if isinstance(loss, int | float) and finite_number(loss):
                    losses.append(float(loss))
        return total, unclipped, losses, counted

    def _update_noise_multiplier(self) -> float:
        if not self.adaptive_clipping:
            return self.release.noise_multiplier
        return update_noise_multiplier(
            self.release.noise_multiplier,
            indicator_noise_std=indicator_noise_std(self.release.expected_cohort_size),
        )

    def _adapt_clip_norm(self, server_round: int, unclipped: int) -> None:
        """Move S towards the median update norm (Andrew et al.) from the noisy unclipped count."""
        cohort = self.release.expected_cohort_size
        fraction = noisy_unclipped_fraction(
            unclipped,
            expected_cohort_size=cohort,
            noise_std=indicator_noise_std(cohort),
            rng=numpy_rng(self.release.seed, server_round, SERVER_NODE, "central-dp-clip-noise"),
        )
        self.release.clip_norm = next_clip_norm(self.release.clip_norm, unclipped_fraction=fraction)
