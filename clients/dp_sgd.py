"""Record-level DP on a client: DP-SGD through Opacus, with its accountant in ``Context.state``.

Each client clips per-sample gradients to ``max_grad_norm`` and adds Gaussian
noise of std ``noise_multiplier * max_grad_norm`` per step, on Poisson-sampled
batches (Abadi et al., CCS 2016), using Opacus's ``GradSampleModule``,
``DPOptimizer`` and ``DPDataLoader``. The privacy spent by a node accumulates
over the rounds it takes part in, so its RDP accountant's history lives in the
node's ``Context.state`` and travels with the node to whichever process runs it.
"""

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from flwr.app import ConfigRecord, Context
from torch.utils.data import DataLoader, Dataset

from fedsim.clients.training import LossFn
from fedsim.records import records_of

if TYPE_CHECKING:  # Opacus is imported where DP-SGD runs: most runs never load it
    from opacus import GradSampleModule

ACCOUNTANT_STATE = "fedsim.dp-sgd"


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD settings of a client: noise multiplier z, clip norm C and the δ of its ε."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or self.max_grad_norm <= 0 or not 0 < self.delta < 1:
            raise ValueError(
                "DP-SGD needs noise_multiplier >= 0, max_grad_norm > 0 and 0 < delta < 1; got "
                f"{self.noise_multiplier}, {self.max_grad_norm}, {self.delta}"
            )


def train_dp_sgd(
    model: "GradSampleModule",
    dataset: Dataset,
    *,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    settings: DPSGD,
) -> tuple[float, float, int]:
    """Train ``epochs`` passes of Poisson-sampled batches; return (mean loss, sample rate, steps).

    The sampling rate is ``batch_size / len(dataset)`` (capped at 1); an epoch is
    ``1 / rate`` steps, as Opacus counts it. ``optimizer`` must be built on the
    wrapped model's parameters.
    """
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

    loader = DPDataLoader.from_data_loader(
        DataLoader(dataset, batch_size=batch_size), generator=generator
    )
    private = DPOptimizer(
        optimizer,
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        # Poisson batches average rate * n samples: Opacus divides the noisy sum by it.
        expected_batch_size=max(1, round(loader.sample_rate * len(loader.dataset))),  # type: ignore[arg-type]
        generator=generator,
    )
    model.train()
    total, steps = 0.0, 0
    with warnings.catch_warnings():
        # Opacus's hooks on a first layer whose inputs need no gradient: harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(epochs):
            for inputs, targets in loader:
                private.zero_grad()
                outputs = model(inputs.to(device))
                # An empty Poisson batch still takes a (noise-only) step: privacy counts it.
                loss = loss_fn(outputs, targets.to(device)) if len(targets) else outputs.sum()
                loss.backward()
                private.step()
                total += loss.item()
                steps += 1
    return total / max(steps, 1), loader.sample_rate, steps


def spend(context: Context, settings: DPSGD, *, sample_rate: float, steps: int) -> float | None:
    """Add ``steps`` DP-SGD steps to the node's accountant; return its ε at ``settings.delta``.

    Without noise there is no privacy to account: ``None``.
    """
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(_history(context))
    if steps:
        accountant.history.append((settings.noise_multiplier, sample_rate, steps))
    context.state[ACCOUNTANT_STATE] = ConfigRecord(
        {
            "noise-multipliers": [float(z) for z, _, _ in accountant.history],
            "sample-rates": [float(q) for _, q, _ in accountant.history],
            "steps": [int(n) for _, _, n in accountant.history],
        }
    )
    if settings.noise_multiplier == 0:
        return None
    return float(accountant.get_epsilon(delta=settings.delta))


def _history(context: Context) -> Iterable[tuple[float, float, int]]:
    record = records_of(context.state, ConfigRecord).get(ACCOUNTANT_STATE)
    if record is None:
        return []
    columns = (cast(list, record[name]) for name in ("noise-multipliers", "sample-rates", "steps"))
    return zip(*columns, strict=True)
