"""Federated DP-GS-WGAN: the generator on the server, a discriminator on every client.

Chen, Orekondy & Fritz, "GS-WGAN: A Gradient-Sanitized Approach for Learning
Differentially Private Generators", NeurIPS 2020 (arXiv 2006.08265), in the
paper's decentralized setting. Only the generator G is released, and it learns
from private data only through the gradient that flows from a discriminator into
each generated image; that gradient is sanitized (per-sample clip, Gaussian
noise), so the discriminators train normally on their own data.

One iteration t (the client's computations are in :mod:`fedsim.gan_training`):

1. The server draws latents z and uniform labels y', generates the B images
   x~ = G(z, y') and samples m clients uniformly; it sends each the images and
   labels (never weights: traffic does not depend on the model size).
2. Each client runs ``critic_steps`` WGAN-GP steps on its discriminator D_j
   (Adam): L_D = mean D(x~, y') - mean D(x, y) + 10 mean(||grad_xhat D(xhat, y)|| - 1)^2
   + 0.001 mean D(x, y)^2 on fresh real batches (x, y) of its data, with
   xhat = a x + (1 - a) x~, a ~ U[0, 1] per sample.
3. It computes g_i = dL_G/dx~_i for L_G = -mean D_j(x~, y') with
   ``torch.autograd.grad`` on the images (D_j's parameters get no gradient),
   clips each to C/B and adds N(0, (2 C sigma / B)^2) noise
   (:func:`fedsim.privacy.gradient_sanitizer.sanitize`), and returns only those B
   sanitized gradients. D_j and its Adam moments stay in the node's ``Context.state``.
4. The server averages the m replies, calls ``x~.backward(mean g^)`` through G,
   steps G with Adam and updates the EMA copy
   theta_ema <- a theta_ema + (1 - a) theta, a = min(1 - 1/(t + 1), ema_decay).
   The EMA generator is the one released and evaluated.

A client trains its discriminator before its first iteration (``warm_start_steps``
iterations of 5 critic steps : 1 step of a throw-away, non-private generator of
its own). The paper argues this costs no privacy because neither the
pre-trained discriminator nor that generator is ever released: in fedsim both
stay on the client, and every gradient that leaves it is sanitized whatever the
discriminator's state, so the accounting is unchanged. The argument does not
cover releasing them.

Differences from the paper: the server cannot know a client's labels, so the
critic's fakes carry the server's uniform labels y' while the gradient penalty
uses the real batch's labels; B is fixed for every iteration (the authors' code
takes it from the last real batch, 32 or 28); and sigma = 0 clips without
normalizing. Privacy is reported two ways every round
(:mod:`fedsim.privacy.gs_wgan_accounting`): the paper's accounting and the joint
one, which is the guarantee.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor, nn

from fedsim import keys
from fedsim.algorithm import ClientAction
from fedsim.arrays import arrays_of, to_array_record
from fedsim.clients import TorchClient
from fedsim.clients.points import (
    config_of,
    local_data,
    optimizer_record,
    to_record,
)
from fedsim.clients.torch_client import resolve_device
from fedsim.gan_training import critic_steps, image_gradients, latent_of, restore_discriminator
from fedsim.loop import EvaluateFn, TrainRound
from fedsim.privacy.gradient_sanitizer import sanitize
from fedsim.records import config_number, get_record
from fedsim.registry import resolve
from fedsim.seeding import (
    SERVER_NODE,
    built_from_seed,
    derive_seed,
    numpy_rng,
    torch_generator,
)
from fedsim.strategies.fedavg import addressed, valid_replies
from fedsim.strategies.multi_exchange import RunsItsOwnRounds
from fedsim.strategies.sampling import available_nodes, sample_cohort

if TYPE_CHECKING:  # it imports Opacus and autodp: loaded when privacy is first reported
    from fedsim.privacy.gs_wgan_accounting import GSWGANAccounting

logger = logging.getLogger(__name__)

GENERATOR_PREFIX, EMA_PREFIX = "generator.", "ema."


# ---------------------------------------------------------------------- client action


def gswgan_step(client: TorchClient, message: Message, context: Context) -> Message:
    """Client action ``train.gswgan``: critic steps, then the sanitized image gradients.

    The node's discriminator (the task's model) and its Adam moments live in
    ``Context.state``; on first contact the discriminator is initialized from the
    run's seed and node and warm-started. The reply holds only the B sanitized
    gradients: no parameters, no metrics computed on private data.
    """
    config = config_of(message)
    fakes_record = get_record(message.content, keys.FAKES, ArrayRecord)
    received = arrays_of(fakes_record)
    fakes = torch.from_numpy(np.array(received[keys.IMAGES])).to(client.device)
    labels = torch.from_numpy(np.array(received[keys.LABELS])).to(client.device)
    seed = config_number(config, keys.SEED, int)
    iteration = config_number(config, keys.ITERATION, int)
    node = int(context.node_config[keys.PARTITION_ID])
    lr = config_number(config, keys.LR, float)
    betas = (config_number(config, keys.BETA1, float), config_number(config, keys.BETA2, float))
    discriminator = client.process_model()
    discriminator.train()
    data = local_data(client, context)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas)
    restore_discriminator(client, discriminator, optimizer, context, config, data, seed, node)
    critic_steps(
        discriminator,
        optimizer,
        data,
        fakes,
        labels,
        steps=config_number(config, keys.CRITIC_STEPS, int),
        rng=torch_generator(seed, iteration, node, "gswgan.critic"),
    )
    sanitized = sanitize(
        image_gradients(discriminator, fakes, labels),
        clip_norm=config_number(config, keys.CLIP_NORM, float),
        noise_multiplier=config_number(config, keys.NOISE_MULTIPLIER, float),
        generator=torch_generator(seed, iteration, node, "gswgan.noise"),
    )
    context.state[keys.DISCRIMINATOR] = to_record(discriminator.state_dict())
    context.state[keys.CRITIC_OPTIMIZER] = optimizer_record(optimizer)
    content = RecordDict(
        {keys.GRADIENTS: to_array_record({keys.IMAGES: sanitized.numpy(force=True)})}
    )
    return Message(content, reply_to=message)


# ---------------------------------------------------------------------- server strategy


@dataclass(kw_only=True, eq=False)
class GSWGAN(RunsItsOwnRounds, Strategy):
    """Federated GS-WGAN: the server's generator learns from clients' sanitized image gradients.

    The clients' model (``model.name``) is the discriminator; ``generator`` is
    the import path of the generator's factory, called with ``input_shape``,
    ``num_classes`` and ``latent_dim``. A round is ``iterations_per_round``
    generator steps, each one exchange with ``clients_per_iteration`` clients
    drawn uniformly (rate q = m / #clients in the accounting). The global arrays
    are the generator's (``generator.*``) and its EMA copy's (``ema.*``); the
    server never sends them.

    Parameters
    ----------
    input_shape, num_classes
        The images' shape (C, H, W) and the number of labels (fedsim passes both).
    batch_size
        B, the generated images per iteration (the clients' real batches too).
    noise_multiplier, clip_norm, delta
        sigma, C and the delta of the reported epsilons.
    warm_start_steps
        Non-private pre-training iterations of each discriminator, on its client,
        before its first exchange (the paper's 2000; 0: none).
    evaluate_samples_per_class
        Samples per class of the round's central evaluation (a Fréchet distance,
        see :meth:`central_evaluator`); 0 turns it off.
    device
        Where the generator runs: ``"cpu"``, ``"cuda:0"``, ... or ``"auto"`` (the
        clients' device is ``client.device``).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    seed: int = 0
    generator: str = "fedsim.models.gs_wgan:small_generator"
    latent_dim: int = 10
    batch_size: int = 32
    critic_steps: int = 5
    iterations_per_round: int = 100
    clients_per_iteration: int = 1
    noise_multiplier: float = 1.07
    clip_norm: float = 1.0
    delta: float = 1e-5
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.9
    ema_decay: float = 0.999
    warm_start_steps: int = 0
    evaluate_samples_per_class: int = 100
    evaluate_classifier_epochs: int = 20
    device: str = "cpu"

    client_actions = (ClientAction(keys.TRAIN_GSWGAN, gswgan_step),)
    honours_privacy: ClassVar[frozenset[str]] = frozenset()
    privacy_refusals: ClassVar[dict[str, str]] = {
        "client.dp_sgd": (
            "GS-WGAN sanitizes the image gradients its clients return (sigma = "
            "strategy.params.noise_multiplier); DP-SGD on the discriminators would not "
            "change what leaves the client"
        ),
        "privacy.local_dp": (
            "the local privatizer privatizes a model in a plain 'train' reply; GS-WGAN's "
            "clients reply sanitized image gradients to train.gswgan"
        ),
        "privacy.central_dp": (
            "GS-WGAN's noise is added on the client, per image gradient; it has no "
            "aggregate model to release centrally"
        ),
        "privacy.secure_aggregation": (
            "fedsim's protocol masks and sums the model of a plain 'train' reply; GS-WGAN's "
            "clients reply image gradients to train.gswgan (only their mean is used, so "
            "the protocol could carry them, but it does not yet)"
        ),
    }

    def __post_init__(self) -> None:
        self.input_shape = tuple(self.input_shape)
        for name in (
            "num_classes", "latent_dim", "batch_size", "iterations_per_round",
            "clients_per_iteration", "lr", "clip_norm",
        ):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"strategy.params.{name} must be > 0, got {getattr(self, name)}")
        for name in ("critic_steps", "noise_multiplier", "warm_start_steps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"strategy.params.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("delta", "ema_decay", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1 or (name == "delta" and self.delta == 0):
                raise ValueError(
                    f"strategy.params.{name} must be in (0, 1), got {getattr(self, name)}"
                )
        self.model = built_from_seed(
            derive_seed(self.seed, 0, SERVER_NODE, "init"), self._build_generator
        )
        self.ema = self._build_generator()
        self.ema.load_state_dict(self.model.state_dict())
        self._device = resolve_device(self.device)
        self.model.to(self._device)
        self.ema.to(self._device)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.lr, betas=(self.beta1, self.beta2)
        )
        self.iterations = 0
        self.population: int | None = None

    def _build_generator(self) -> nn.Module:
        factory = resolve("strategy.params.generator", self.generator, {})
        return factory(
            input_shape=self.input_shape, num_classes=self.num_classes, latent_dim=self.latent_dim
        )

    # -------------------------------------------------------------- the run's model

    def initial_arrays(self) -> ArrayRecord:
        """Return the generator and its EMA copy before the first iteration (from the seed)."""
        return self._arrays()

    def _arrays(self) -> ArrayRecord:
        return to_array_record(
            {
                **{
                    GENERATOR_PREFIX + k: v.numpy(force=True)
                    for k, v in self.model.state_dict().items()
                },
                **{EMA_PREFIX + k: v.numpy(force=True) for k, v in self.ema.state_dict().items()},
            }
        )

    def _load(self, arrays: ArrayRecord) -> None:
        values = arrays.to_torch_state_dict()
        for prefix, module in ((GENERATOR_PREFIX, self.model), (EMA_PREFIX, self.ema)):
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
            )

    def released_generator(self, arrays: ArrayRecord | None = None) -> nn.Module:
        """Return the EMA generator (of ``arrays``, e.g. a run's ``model.pt``), in eval mode."""
        if arrays is not None:
            self._load(arrays)
        return self.ema.eval()

    # -------------------------------------------------------------- training

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Run ``iterations_per_round`` generator steps, one exchange each."""
        self._load(arrays)
        self.model.train()
        nodes = available_nodes(grid, self.clients_per_iteration)
        self.population = len(nodes)
        sent_per_iteration: list[int] = []
        for _ in range(self.iterations_per_round):
            self.iterations += 1
            t = self.iterations
            rng = torch_generator(self.seed, t, SERVER_NODE, "gswgan.latent")
            labels = torch.randint(self.num_classes, (self.batch_size,), generator=rng)
            latents = latent_of(self.model, self.batch_size, rng).to(self._device)
            fakes = self.model(latents, labels.to(self._device))
            cohort = sample_cohort(
                nodes,
                self.clients_per_iteration,
                numpy_rng(self.seed, t, SERVER_NODE, "gswgan.clients"),
            )
            replies = yield addressed(
                server_round,
                {
                    keys.FAKES: to_array_record(
                        {keys.IMAGES: fakes.numpy(force=True), keys.LABELS: labels.numpy()}
                    )
                },
                self._client_config(config, t),
                cohort,
                keys.TRAIN_GSWGAN,
            )
            gradient = self._mean_gradient(replies, tuple(fakes.shape))
            sent_per_iteration.append(len(cohort))
            if gradient is None:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            fakes.backward(gradient.to(self._device))
            self.optimizer.step()
            self._update_ema(t)
        return self._arrays(), MetricRecord({"iterations": self.iterations})

    def _client_config(self, config: ConfigRecord, iteration: int) -> ConfigRecord:
        return ConfigRecord(
            {
                keys.SEED: config_number(config, keys.SEED, int, self.seed),
                keys.ITERATION: iteration,
                keys.CRITIC_STEPS: self.critic_steps,
                keys.BATCH_SIZE: self.batch_size,
                keys.CLIP_NORM: self.clip_norm,
                keys.NOISE_MULTIPLIER: self.noise_multiplier,
                keys.LR: self.lr,
                keys.BETA1: self.beta1,
                keys.BETA2: self.beta2,
                keys.WARM_START_STEPS: self.warm_start_steps,
                keys.GENERATOR: self.generator,
                keys.LATENT_DIM: self.latent_dim,
                keys.NUM_CLASSES: self.num_classes,
            }
        )

    def _mean_gradient(self, replies: Iterable[Message], shape: tuple[int, ...]) -> Tensor | None:
        """Return the mean of the valid replies' sanitized gradients (None: no valid reply)."""
        total, count = None, 0
        for reply in valid_replies(replies):
            try:
                gradient = arrays_of(get_record(reply.content, keys.GRADIENTS, ArrayRecord))[
                    keys.IMAGES
                ]
            except KeyError as exc:
                logger.warning("skipping node %d's reply: %s", reply.metadata.src_node_id, exc)
                continue
            if gradient.shape != shape:
                logger.warning(
                    "skipping node %d's reply: gradients of shape %s, expected %s",
                    reply.metadata.src_node_id, gradient.shape, shape,
                )  # fmt: skip
                continue
            value = torch.from_numpy(np.array(gradient, dtype=np.float32))
            total = value if total is None else total + value
            count += 1
        return None if total is None else total / count

    def _update_ema(self, iteration: int) -> None:
        """Average the parameters (the authors' EMA); copy the buffers (spectral norm's u, v)."""
        decay = min(1 - 1 / (iteration + 1), self.ema_decay)
        with torch.no_grad():
            for ema, value in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                ema.mul_(decay).add_(value, alpha=1 - decay)
            for ema_buffer, buffer in zip(self.ema.buffers(), self.model.buffers(), strict=True):
                ema_buffer.copy_(buffer)

    # -------------------------------------------------------------- privacy and state

    def privacy(self) -> dict[str, float]:
        """Both epsilons so far; ``epsilon`` is the joint one, the guarantee.

        See :mod:`fedsim.privacy.gs_wgan_accounting`: ``epsilon_paper`` is the paper's
        accounting, reported beside it for comparison with published numbers.
        """
        if self.population is None:
            return {}
        epsilons = self.accounting().epsilons(self.iterations)
        return {"epsilon": epsilons["epsilon_joint"], **epsilons}

    def accounting(self) -> "GSWGANAccounting":
        """Return the run's accounting: rate q = clients per iteration / clients."""
        from fedsim.privacy.gs_wgan_accounting import GSWGANAccounting

        return GSWGANAccounting(
            noise_multiplier=self.noise_multiplier,
            sampling_rate=self.clients_per_iteration / (self.population or 1),
            batch_size=self.batch_size,
            delta=self.delta,
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the generator's optimizer, the iteration count and the population (for resume)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "iterations": self.iterations,
            "population": self.population,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the generators come back with the run's arrays."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.iterations, self.population = state["iterations"], state["population"]

    # -------------------------------------------------------------- evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the clients' data is evaluated only through the generator."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def central_evaluator(self, test_x: Tensor, test_y: Tensor) -> EvaluateFn | None:
        """Return the Fréchet distance of EMA samples to the test split, per evaluation.

        The features are those of a classifier trained on the server's test split
        (:func:`fedsim.generative_eval.frechet_evaluator`), not Inception's: the number
        is comparable across runs of one dataset, not with published FIDs.
        """
        if not self.evaluate_samples_per_class:
            return None
        from fedsim.generative_eval import frechet_evaluator

        return frechet_evaluator(
            self.sample, test_x, test_y, self.num_classes,
            samples_per_class=self.evaluate_samples_per_class,
            epochs=self.evaluate_classifier_epochs, seed=self.seed,
        )  # fmt: skip

    def sample(
        self, arrays: ArrayRecord, labels: Tensor, *, seed_purpose: str = "gswgan.evaluate"
    ) -> Tensor:
        """Return EMA-generator images for ``labels`` (latents seeded by the run's seed)."""
        generator = self.released_generator(arrays)
        rng = torch_generator(self.seed, 0, SERVER_NODE, seed_purpose)
        with torch.no_grad():
            latents = latent_of(generator, len(labels), rng).to(self._device)
            return generator(latents, labels.to(self._device)).cpu()

    def summary(self) -> None:
        """Log the settings."""
        logger.info(
            "GSWGAN: B %d, %d critic steps, sigma %g, C %g, %d client(s) per iteration",
            self.batch_size, self.critic_steps, self.noise_multiplier, self.clip_norm,
            self.clients_per_iteration,
        )  # fmt: skip
