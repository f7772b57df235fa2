"""GS-WGAN's local computations: the critic's WGAN-GP steps, image gradients, warm start.

Chen, Orekondy & Fritz, "GS-WGAN: A Gradient-Sanitized Approach for Learning
Differentially Private Generators", NeurIPS 2020. These are the pieces of one
iteration that touch a discriminator and its data, shared by the federated
strategy's client action (``fedsim.strategies.gs_wgan``) and by the benchmark's
centralized loop, so that both run the same algorithm:

- the critic loss, WGAN-GP plus the authors' drift term:
  L_D = mean D(x~, y') - mean D(x, y) + 10 mean(||grad_xhat D(xhat, y)|| - 1)^2
  + 0.001 mean D(x, y)^2, xhat = a x + (1 - a) x~ with a ~ U[0, 1] per sample;
- the gradient of L_G = -mean D(x~, y') at each generated image, taken with
  ``torch.autograd.grad`` so that the discriminator's parameters receive none;
- the non-private warm start of a discriminator against a throw-away generator, and a
  client's restore of its discriminator from ``Context.state`` (or its seeded creation).

Every random draw comes from an explicit ``torch.Generator``.
"""

from collections.abc import Callable
from typing import cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import Tensor, nn

from fedsim import keys
from fedsim.clients.local_routines import LocalData
from fedsim.clients.points import load_optimizer, tensors
from fedsim.clients.torch_client import TorchClient
from fedsim.models.gs_wgan import sample_latent
from fedsim.records import config_number, records_of
from fedsim.registry import resolve
from fedsim.seeding import built_from_seed, derive_seed, torch_generator

GRADIENT_PENALTY = 10.0  # WGAN-GP's lambda
DRIFT_PENALTY = 0.001  # keeps the critic's real scores near 0 (the authors' epsilon drift)

Discriminator = Callable[[Tensor, Tensor], Tensor]


def latent_of(generator: nn.Module, batch_size: int, rng: torch.Generator) -> Tensor:
    """Return B latents for ``generator``: z ~ Bernoulli(0.5)^latent_dim, the paper's."""
    return sample_latent(batch_size, cast(int, generator.latent_dim), rng)


def critic_loss(
    discriminator: Discriminator,
    real: Tensor,
    real_labels: Tensor,
    fakes: Tensor,
    fake_labels: Tensor,
    rng: torch.Generator,
) -> Tensor:
    """WGAN-GP's critic loss with the authors' drift term (see the module docstring).

    The gradient penalty interpolates each real image with a fake one; with fewer
    real images than fakes (a small client), the first ``len(real)`` fakes are used.
    """
    real_scores = discriminator(real, real_labels)
    mix = torch.rand(len(real), *([1] * (real.ndim - 1)), generator=rng).to(real.device)
    mixed = (mix * real + (1 - mix) * fakes[: len(real)]).requires_grad_(True)
    (slope,) = torch.autograd.grad(
        discriminator(mixed, real_labels).sum(), mixed, create_graph=True
    )
    penalty = ((slope.flatten(1).norm(dim=1) - 1) ** 2).mean()
    return (
        discriminator(fakes, fake_labels).mean()
        - real_scores.mean()
        + GRADIENT_PENALTY * penalty
        + DRIFT_PENALTY * (real_scores**2).mean()
    )


def critic_steps(
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: LocalData,
    fakes: Tensor,
    fake_labels: Tensor,
    *,
    steps: int,
    rng: torch.Generator,
) -> None:
    """Run ``steps`` critic steps on fresh real batches of len(fakes) samples against ``fakes``."""
    for _ in range(steps):
        real, real_labels = data.batch(len(fakes), rng)
        optimizer.zero_grad(set_to_none=True)
        critic_loss(discriminator, real, real_labels, fakes, fake_labels, rng).backward()
        optimizer.step()


def image_gradients(discriminator: Discriminator, fakes: Tensor, labels: Tensor) -> Tensor:
    """Return g_i = dL_G/dx~_i for L_G = -mean D(x~, y'): one row per image.

    ``torch.autograd.grad`` asks for the images' gradient only, so the
    discriminator's parameters receive none (no backward hook, as the authors'
    torch-1.2 code used).
    """
    images = fakes.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(-discriminator(images, labels).mean(), images)
    return gradient


def warm_start(
    discriminator: nn.Module,
    data: LocalData,
    generator: nn.Module,
    *,
    steps: int,
    critic_steps_per_step: int,
    batch_size: int,
    lr: float,
    betas: tuple[float, float],
    rng: torch.Generator,
) -> None:
    """Pre-train ``discriminator`` against ``generator``, a throw-away one, without noise.

    Each of ``steps`` iterations runs the critic steps on fakes with the real
    batch's labels, then one non-private generator step. Neither model leaves
    the caller (see the module docstring for why this costs no privacy).
    """
    critic_optimizer = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas)
    generator_optimizer = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
    for _ in range(steps):
        for _ in range(critic_steps_per_step):
            real, labels = data.batch(batch_size, rng)
            with torch.no_grad():
                fakes = generator(latent_of(generator, len(labels), rng).to(real.device), labels)
            critic_optimizer.zero_grad(set_to_none=True)
            critic_loss(discriminator, real, labels, fakes, labels, rng).backward()
            critic_optimizer.step()
        labels = torch.randint(cast(int, generator.num_classes), (batch_size,), generator=rng)
        labels = labels.to(data.targets.device)
        fakes = generator(latent_of(generator, batch_size, rng).to(labels.device), labels)
        generator_optimizer.zero_grad(set_to_none=True)
        (-discriminator(fakes, labels).mean()).backward()
        generator_optimizer.step()


def restore_discriminator(
    client: TorchClient,
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    context: Context,
    config: ConfigRecord,
    data: LocalData,
    seed: int,
    node: int,
) -> None:
    """Load the node's discriminator and moments, or create and warm-start them."""
    stored = records_of(context.state, ArrayRecord)
    if keys.DISCRIMINATOR in stored:
        discriminator.load_state_dict(tensors(client, stored[keys.DISCRIMINATOR]))
        load_optimizer(optimizer, stored[keys.CRITIC_OPTIMIZER])
        return
    initial = built_from_seed(
        derive_seed(seed, 0, node, "gswgan.discriminator"), client.task.model_fn
    )
    discriminator.load_state_dict(initial.state_dict())
    steps = config_number(config, keys.WARM_START_STEPS, int)
    if not steps:
        return
    generator = built_from_seed(
        derive_seed(seed, 0, node, "gswgan.warm-start-generator"),
        lambda: generator_factory(config)(
            input_shape=tuple(data.inputs.shape[1:]),
            num_classes=config_number(config, keys.NUM_CLASSES, int),
            latent_dim=config_number(config, keys.LATENT_DIM, int),
        ),
    ).to(client.device)
    warm_start(
        discriminator,
        data,
        generator,
        steps=steps,
        critic_steps_per_step=config_number(config, keys.CRITIC_STEPS, int),
        batch_size=config_number(config, keys.BATCH_SIZE, int),
        lr=config_number(config, keys.LR, float),
        betas=(config_number(config, keys.BETA1, float), config_number(config, keys.BETA2, float)),
        rng=torch_generator(seed, 0, node, "gswgan.warm-start"),
    )


def generator_factory(config: ConfigRecord) -> Callable[..., nn.Module]:
    """Return the generator factory ``strategy.params.generator`` names."""
    return resolve("strategy.params.generator", str(config[keys.GENERATOR]), {})
