"""Federated GS-WGAN against a plain centralized GS-WGAN loop: time per generator iteration.

::

    python experiments/bench/gswgan.py                  # 10 triples of 50 iterations
    python experiments/bench/gswgan.py --triples 20 --iterations 100
    python experiments/bench/gswgan.py --scale paper --triples 3 --iterations 2 --warmup 1

``--scale paper`` runs the paper's models on 28x28 images (random ones: MNIST itself
needs the Hub), for the CPU throughput of the MNIST configuration.

The centralized loop is the paper's algorithm with everything in one process and
nothing serialized: one discriminator module and Adam optimizer per block, kept
alive, and the same models, critic steps, image gradients and sanitizer
(``fedsim.gan_training``, ``fedsim.privacy.gradient_sanitizer``) as the
federated strategy. The federated runs are ``GSWGAN`` on the inline and threads
engines, where every iteration is an exchange of Flower messages and every
discriminator lives in its node's ``Context.state`` between iterations. Blocks of
iterations run in triples (centralized, inline, threads), the order rotating from
triple to triple so that the machine's drift cancels; the script prints each
system's seconds per iteration and the median ratio to the centralized loop with a
distribution-free interval. Target: inline within 1.2x of the centralized loop.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from flwr.app import ConfigRecord  # noqa: E402
from torch import nn  # noqa: E402

from experiments.bench.report import median_interval  # noqa: E402
from fedsim import keys  # noqa: E402
from fedsim.clients import TorchTask, make_client_app  # noqa: E402
from fedsim.clients.local_routines import LocalData  # noqa: E402
from fedsim.data import FederatedData, build_federated_data  # noqa: E402
from fedsim.data.datasets import CentralDataset  # noqa: E402
from fedsim.data.federated import partitioned  # noqa: E402
from fedsim.engine import InlineGrid, ThreadedGrid  # noqa: E402
from fedsim.gan_training import critic_steps, image_gradients, latent_of  # noqa: E402
from fedsim.loop import run_rounds  # noqa: E402
from fedsim.privacy.gradient_sanitizer import sanitize  # noqa: E402
from fedsim.registry import resolve  # noqa: E402
from fedsim.strategies.gs_wgan import GSWGAN  # noqa: E402

SEED, CLIENTS, BATCH, CRITIC_STEPS, SIGMA, CLIP = 0, 24, 32, 5, 1.07, 1.0
CLASSES, LR, BETAS = 10, 1e-4, (0.5, 0.9)


@dataclass(frozen=True)
class Scale:
    """The models and images of one benchmark scale."""

    shape: tuple[int, int, int]
    generator: str
    discriminator: str

    def models(self) -> tuple[Callable[[], nn.Module], Callable[[], nn.Module]]:
        """Return the generator and discriminator factories."""
        generator = resolve("generator", self.generator, {})
        discriminator = resolve("discriminator", self.discriminator, {})
        return (
            lambda: generator(self.shape, CLASSES),
            lambda: discriminator(self.shape, CLASSES),
        )

    def data(self) -> FederatedData:
        """Digits for the small scale; 60 random images per client for the paper's."""
        if self.shape == (1, 8, 8):
            return build_federated_data(
                dataset="digits", partitioner="iid", num_clients=CLIENTS, seed=SEED
            )
        rng = torch.Generator().manual_seed(SEED)
        count = 60 * CLIENTS
        images = torch.rand(count, *self.shape, generator=rng)
        labels = torch.randint(CLASSES, (count,), generator=rng)
        central = CentralDataset(images, labels, images[:10], labels[:10], CLASSES)
        return partitioned(central, partitioner="iid", num_clients=CLIENTS, seed=SEED)


SCALES = {
    "small": Scale((1, 8, 8), "fedsim.models.gs_wgan:small_generator",
                   "fedsim.models.gs_wgan:small_discriminator"),
    "paper": Scale((1, 28, 28), "fedsim.models.gs_wgan:paper_generator",
                   "fedsim.models.gs_wgan:paper_discriminator"),
}  # fmt: skip


class CentralizedGSWGAN:
    """The paper's loop in one process: k live discriminators, one generator, no messages."""

    def __init__(self, data: FederatedData, scale: Scale) -> None:
        torch.manual_seed(SEED)
        generator, discriminator = scale.models()
        self.generator = generator()
        self.ema = generator()
        self.ema.load_state_dict(self.generator.state_dict())
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=LR, betas=BETAS)
        self.blocks = [
            LocalData(*data.client_dataset(j).tensors) for j in range(data.num_partitions)
        ]
        self.critics = [discriminator() for _ in self.blocks]
        self.critic_optimizers = [
            torch.optim.Adam(d.parameters(), lr=LR, betas=BETAS) for d in self.critics
        ]
        self.rng = torch.Generator().manual_seed(SEED)
        self.iterations = 0

    def iterate(self, count: int) -> None:
        """Run ``count`` generator iterations."""
        for _ in range(count):
            self.iterations += 1
            j = int(torch.randint(len(self.blocks), (1,), generator=self.rng))
            labels = torch.randint(CLASSES, (BATCH,), generator=self.rng)
            fakes = self.generator(latent_of(self.generator, BATCH, self.rng), labels)
            detached = fakes.detach()
            critic = self.critics[j]
            critic_steps(
                critic, self.critic_optimizers[j], self.blocks[j], detached, labels,
                steps=CRITIC_STEPS, rng=self.rng,
            )  # fmt: skip
            gradient = sanitize(
                image_gradients(critic, detached, labels),
                clip_norm=CLIP, noise_multiplier=SIGMA, generator=self.rng,
            )  # fmt: skip
            self.optimizer.zero_grad(set_to_none=True)
            fakes.backward(gradient)
            self.optimizer.step()
            decay = min(1 - 1 / (self.iterations + 1), 0.999)
            with torch.no_grad():
                for ema, value in zip(
                    self.ema.parameters(), self.generator.parameters(), strict=True
                ):
                    ema.mul_(decay).add_(value, alpha=1 - decay)


class FederatedGSWGAN:
    """``GSWGAN`` on a fedsim engine: one round of ``count`` iterations per call."""

    def __init__(self, data: FederatedData, scale: Scale, grid_of: Callable[..., object]) -> None:
        self.scale = scale
        task = TorchTask(
            model_fn=scale.models()[1],
            loss_fn=nn.CrossEntropyLoss(),
            load_partition=lambda pid, _n: data.client_dataset(pid),
        )
        self.grid = grid_of(make_client_app(task, algorithms=[GSWGAN]), num_nodes=CLIENTS)
        self.strategy: GSWGAN | None = None
        self.arrays = None

    def iterate(self, count: int) -> None:
        """Run ``count`` generator iterations as one round."""
        if self.strategy is None:
            self.strategy = GSWGAN(
                input_shape=self.scale.shape, num_classes=CLASSES, seed=SEED, batch_size=BATCH,
                generator=self.scale.generator,
                critic_steps=CRITIC_STEPS, iterations_per_round=count,
                noise_multiplier=SIGMA, clip_norm=CLIP, evaluate_samples_per_class=0,
            )  # fmt: skip
            self.arrays = self.strategy.initial_arrays()
        self.strategy.iterations_per_round = count
        self.arrays = run_rounds(
            strategy=self.strategy,
            grid=self.grid,  # type: ignore[arg-type]
            initial_arrays=self.arrays,  # type: ignore[arg-type]
            num_rounds=1,
            train_config=ConfigRecord({keys.SEED: SEED}),
        )


def main() -> None:
    """Run the triples and print seconds per iteration and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triples", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument(
        "--warmup", type=int, default=CLIENTS * 4, help="iterations before timing (per system)"
    )
    args = parser.parse_args()
    scale = SCALES[args.scale]
    data = scale.data()
    systems = {
        "centralized": CentralizedGSWGAN(data, scale),
        "inline": FederatedGSWGAN(data, scale, InlineGrid),
        "threads": FederatedGSWGAN(
            data,
            scale,
            lambda app, num_nodes: ThreadedGrid(app, num_nodes=num_nodes, num_workers=1),
        ),
    }
    names = list(systems)
    for system in systems.values():  # warm-up: discriminators exist, caches are hot
        system.iterate(args.warmup)
    per_iteration: dict[str, list[float]] = {name: [] for name in names}
    for triple in range(args.triples):
        order = names[triple % 3 :] + names[: triple % 3]
        for name in order:
            start = time.perf_counter()
            systems[name].iterate(args.iterations)
            per_iteration[name].append((time.perf_counter() - start) / args.iterations)
    print(
        f"GS-WGAN, {args.scale} models on {scale.shape} images: {CLIENTS} clients, B = {BATCH}, "
        f"{CRITIC_STEPS} critic steps, "
        f"{args.triples} triples of {args.iterations} iterations, "
        f"torch threads {torch.get_num_threads()}"
    )
    for name in names:
        median = statistics.median(per_iteration[name])
        print(f"  {name:12s} {median * 1e3:9.2f} ms/iteration ({1 / median:.2f} iterations/s)")
    for name in names[1:]:
        ratios = [
            f / c for f, c in zip(per_iteration[name], per_iteration["centralized"], strict=True)
        ]
        interval = median_interval(ratios)
        assert interval is not None
        low, high, coverage = interval
        print(
            f"  {name} / centralized: median {statistics.median(ratios):.3f} "
            f"({coverage:.0%} interval {low:.3f}-{high:.3f})"
        )


if __name__ == "__main__":
    main()
