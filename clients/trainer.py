"""One local trainer for every client routine: plain SGD, or DP-SGD with its accountant.

Every client action computes through a :class:`Trainer`, so ``client.dp_sgd``
means the same thing for every algorithm: each gradient a client computes from
its records is clipped per sample and noised, and its privacy cost accounted.
Routines come in two shapes, and the trainer serves both:

* **epochs of an optimizer on a module** (FedAvg's and Flower's ``train``):
  :meth:`Trainer.train_epochs`; the DP trainer runs Opacus's ``DPOptimizer`` on
  Poisson batches (``fedsim.clients.dp_sgd``);
* **gradient queries at explicit points** (Local SGD's and SCAFFOLD's steps,
  minibatch SGD's gradients, SARAH's and BVR-L-SGD's estimates):
  :meth:`Trainer.batch` draws the samples, :meth:`Trainer.gradient` and
  :meth:`Trainer.difference` answer. The DP trainer draws Poisson batches at
  rate q = b/n, clips each sample's gradient (or, for the SARAH recursion, each
  sample's difference of gradients at two points) to L2 norm C, adds
  N(0, (σC)²) to the sum and divides by the expected batch size qn: one
  subsampled Gaussian step per query (Abadi et al., CCS 2016).

:meth:`Trainer.spend` adds the round's steps to the node's RDP accountant in
``Context.state`` and returns what the reply reports (``dp-epsilon``).
"""

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import torch
from flwr.app import ConfigRecord, Context, Message
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset

from fedsim import keys
from fedsim.clients.dp_sgd import DPSGD, spend, train_dp_sgd
from fedsim.clients.local_routines import LocalData, Point, batch_gradient, gradient_difference
from fedsim.clients.training import LossFn, train_epochs
from fedsim.records import config_number, records_of
from fedsim.seeding import torch_generator

if TYPE_CHECKING:
    from fedsim.clients.torch_client import TorchClient, TorchTask

Batch = tuple[Tensor, Tensor]


class Trainer(Protocol):
    """What a client routine asks of local training; see the module docstring."""

    def train_epochs(
        self,
        client: "TorchClient",
        dataset: Dataset,
        *,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        batch_size: int,
    ) -> float:
        """Train the client's loaded model in place on ``loss_fn``; return its mean over batches."""

    def batch(self, data: LocalData, size: int, generator: torch.Generator) -> Batch:
        """Draw a minibatch of about ``size`` samples (0: all of them)."""

    def gradient(
        self, model: nn.Module, loss_fn: LossFn, point: Mapping[str, Tensor], batch: Batch
    ) -> tuple[Point, float | None]:
        """Return the (privatized) gradient of the batch-mean loss at ``point``, and the loss."""

    def difference(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        point: Mapping[str, Tensor],
        previous: Mapping[str, Tensor],
        batch: Batch,
    ) -> tuple[Point, float | None]:
        """Return g(point; I) - g(previous; I) on one batch I (privatized), and the loss."""

    def spend(self, context: Context) -> dict[str, float]:
        """Account the queries answered so far; return the metrics the reply reports."""


class PlainTrainer:
    """Plain SGD: fixed-size batches without replacement, exact gradients, nothing to account.

    ``shuffle`` orders the epochs of :meth:`train_epochs`.
    """

    def __init__(self, shuffle: torch.Generator) -> None:
        self.shuffle = shuffle

    def train_epochs(
        self,
        client: "TorchClient",
        dataset: Dataset,
        *,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        batch_size: int,
    ) -> float:
        """Train with :func:`fedsim.clients.training.train_epochs`."""
        return train_epochs(
            client.process_model(),
            dataset,
            loss_fn=loss_fn,
            optimizer=optimizer,
            epochs=epochs,
            batch_size=batch_size,
            generator=self.shuffle,
            device=client.device,
        )

    def batch(self, data: LocalData, size: int, generator: torch.Generator) -> Batch:
        """Draw ``size`` distinct samples uniformly (0 or more than there are: all)."""
        return data.batch(size, generator)

    def gradient(
        self, model: nn.Module, loss_fn: LossFn, point: Mapping[str, Tensor], batch: Batch
    ) -> tuple[Point, float | None]:
        """Return the exact batch gradient."""
        return batch_gradient(model, loss_fn, point, batch)

    def difference(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        point: Mapping[str, Tensor],
        previous: Mapping[str, Tensor],
        batch: Batch,
    ) -> tuple[Point, float | None]:
        """Return the exact difference of batch gradients."""
        return gradient_difference(model, loss_fn, point, previous, batch)

    def spend(self, context: Context) -> dict[str, float]:
        """Nothing to account."""
        return {}


class DPTrainer:
    """DP-SGD: Poisson batches, per-sample clipping, Gaussian noise, an RDP accountant.

    Parameters
    ----------
    settings
        Noise multiplier σ, clip norm C and the δ of the reported ε.
    noise
        The generator of the queries' noise; ``epochs`` that of Opacus's batches and
        noise in :meth:`train_epochs`. Both are seeded per (round, node, purpose), so
        every engine draws the same.
    """

    def __init__(self, settings: DPSGD, *, noise: torch.Generator, epochs: torch.Generator) -> None:
        self.settings = settings
        self.noise, self.epochs = noise, epochs
        self._steps: Counter[float] = Counter()  # sample rate -> queries answered
        self._rate = 1.0  # the sampling rate of the last batch drawn
        self._expected = 1.0  # and its expected size, q n

    def train_epochs(
        self,
        client: "TorchClient",
        dataset: Dataset,
        *,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        batch_size: int,
    ) -> float:
        """Train with Opacus's ``DPOptimizer`` on Poisson batches (``train_dp_sgd``).

        The model trains inside the client's Opacus ``GradSampleModule``; ``optimizer``
        is built on the model's parameters, which it shares.
        """
        loss, rate, steps = train_dp_sgd(
            client.private_model(),
            dataset,
            loss_fn=loss_fn,
            optimizer=optimizer,
            epochs=epochs,
            batch_size=batch_size,
            generator=self.epochs,
            device=client.device,
            settings=self.settings,
        )
        self._steps[rate] += steps
        return loss

    def batch(self, data: LocalData, size: int, generator: torch.Generator) -> Batch:
        """Take each sample with probability q = size / n (all of them at q = 1)."""
        n = len(data)
        self._rate = 1.0 if size <= 0 or size >= n else size / n
        self._expected = self._rate * n
        keep = torch.rand(n, generator=generator) < self._rate
        index = keep.nonzero().flatten().to(data.inputs.device)
        return data.inputs[index], data.targets[index]

    def gradient(
        self, model: nn.Module, loss_fn: LossFn, point: Mapping[str, Tensor], batch: Batch
    ) -> tuple[Point, float | None]:
        """Return the clipped, noised mean of the per-sample gradients at ``point``."""
        per_sample, loss = self._per_sample(model, loss_fn, point, batch)
        return self._privatize(per_sample, point), loss

    def difference(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        point: Mapping[str, Tensor],
        previous: Mapping[str, Tensor],
        batch: Batch,
    ) -> tuple[Point, float | None]:
        """Return the clipped, noised mean of the per-sample differences g_i(point) - g_i(previous).

        A record changes one sample's difference, so clipping the difference (not
        each gradient) bounds the sensitivity by C.
        """
        now, loss = self._per_sample(model, loss_fn, point, batch)
        before, _ = self._per_sample(model, loss_fn, previous, batch)
        return self._privatize({k: now[k] - before[k] for k in now}, point), loss

    def spend(self, context: Context) -> dict[str, float]:
        """Add this message's steps to the node's accountant; report its ε (none at σ = 0)."""
        epsilon = None
        for rate, steps in sorted(self._steps.items()) or [(1.0, 0)]:
            epsilon = spend(context, self.settings, sample_rate=rate, steps=steps)
        self._steps.clear()
        return {} if epsilon is None else {keys.DP_EPSILON: epsilon}

    def _per_sample(
        self, model: nn.Module, loss_fn: LossFn, point: Mapping[str, Tensor], batch: Batch
    ) -> tuple[Point, float | None]:
        """Return each sample's gradient at ``point`` (stacked), and the batch-mean loss."""
        inputs, targets = batch
        params = {name: value.detach() for name, value in point.items()}
        if len(targets) == 0:
            return {k: v.new_zeros((0, *v.shape)) for k, v in params.items()}, None

        def loss_of_one(p: Point, x: Tensor, y: Tensor) -> Tensor:
            return loss_fn(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

        grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, inputs, targets)
        with torch.no_grad():
            loss = loss_fn(functional_call(model, params, (inputs,)), targets).item()
        return grads, loss

    def _privatize(self, per_sample: Point, point: Mapping[str, Tensor]) -> Point:
        """Clip each sample to C, sum, add N(0, (σC)²), divide by the expected batch size."""
        clip, sigma = self.settings.max_grad_norm, self.settings.noise_multiplier
        self._steps[self._rate] += 1
        flat = [g.flatten(start_dim=1) for g in per_sample.values()]
        norms = torch.cat(flat, dim=1).norm(dim=1) if flat and len(flat[0]) else None
        result = {}
        for name, grads in per_sample.items():
            if norms is None:
                total = torch.zeros_like(point[name])
            else:
                factors = (clip / (norms + 1e-12)).clamp(max=1.0)
                total = torch.einsum("i,i...->...", factors, grads)
            noise = torch.normal(0.0, sigma * clip, total.shape, generator=self.noise)
            result[name] = (total + noise.to(total.device, total.dtype)) / self._expected
        return result


def trainer_for(task: "TorchTask", message: Message, context: Context) -> Trainer:
    """Return the trainer of one message: DP-SGD if the task asks for it, plain SGD otherwise.

    Its generators are keyed by (seed, round, node, purpose); a query's noise by the
    message type too, so the exchanges of one round draw independent noise.
    """
    config = records_of(message.content, ConfigRecord).get(keys.CONFIG, ConfigRecord())
    seed = config_number(config, keys.SEED, int, 0)
    round_ = config_number(config, keys.SERVER_ROUND, int, 0)
    partition = int(context.node_config[keys.PARTITION_ID])
    if task.dp_sgd is None:
        return PlainTrainer(torch_generator(seed, round_, partition, "shuffle"))
    return DPTrainer(
        task.dp_sgd,
        noise=torch_generator(seed, round_, partition, f"dp-noise:{message.metadata.message_type}"),
        epochs=torch_generator(seed, round_, partition, "dp-sgd"),
    )
