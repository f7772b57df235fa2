"""Apple's pfl 0.6 as a benchmarked system: W1 run by pfl's ``SimulatedBackend``.

This module holds ``run_pfl`` and what it needs: the W1 CNN with the methods pfl's
``PyTorchModel`` calls, the per-user datasets built from fedsim's seeding, and pfl's
algorithm and callback subclasses that train only and mark round boundaries. It is apart from
``systems.py`` because it is the largest runner and the only one on an optional extra (the
``bench`` extra); pfl itself is imported only inside ``run_pfl``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from experiments.bench.systems import SystemUnavailable, Timing, _default_threads
from experiments.bench.workload import (
    BATCH_SIZE,
    LR,
    Workload,
    client_tensors,
    cohort,
    initial_state,
    make_model,
    shuffle_generator,
)


class PflCnn(nn.Module):
    """The workload's model with the ``loss`` and ``metrics`` that pfl's ``PyTorchModel`` calls."""

    def __init__(self, state: dict[str, Tensor], model: str) -> None:
        super().__init__()
        self.net = make_model(model)
        self.net.load_state_dict(state)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, inputs: Tensor) -> Tensor:
        """Return class scores."""
        return self.net(inputs)

    def loss(self, inputs: Tensor, labels: Tensor, **_: Any) -> Tensor:
        """Return the batch-mean cross-entropy, the loss every system trains on."""
        return self.loss_fn(self(inputs), labels)

    @torch.no_grad()
    def metrics(self, inputs: Tensor, labels: Tensor, **_: Any) -> dict[str, Any]:
        """Return the summed loss (pfl requires the method; W1 never evaluates)."""
        from pfl.metrics import Weighted

        return {"loss": Weighted(self.loss_fn(self(inputs), labels).item() * len(labels), 1)}


def run_pfl(workload: Workload, *, rounds: int, seed: int, device: str = "cpu") -> Timing:
    """Run pfl's FederatedAveraging on its in-process SimulatedBackend.

    Local SGD (lr 0.05, batch 32, 1 epoch), updates weighted by examples, and a
    central SGD step of lr 1.0 on the averaged update, so the new global model is
    the weighted mean of the local ones: FedAvg. pfl's user sampler replays
    fedsim's cohorts and each user's data comes pre-shuffled in fedsim's batch
    order (pfl batches a user's data in order), so pfl trains what fedsim does.
    """
    if device != "cpu":
        raise SystemUnavailable("the pfl row runs on CPU only")
    try:
        import pfl  # noqa: F401
    except ImportError as exc:
        raise SystemUnavailable("pip install -e '.[bench]'") from exc
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import NNAlgorithmParams
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.model.pytorch import PyTorchModel

    timing = Timing(time.perf_counter(), threads=_default_threads())
    net = PflCnn(initial_state(seed, workload.model), workload.model)
    model = PyTorchModel(
        model=net,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    sampled = ((r, c) for r in range(1, rounds + 1) for c in cohort(workload, seed=seed, round_=r))
    users = FederatedDataset(_pfl_user_dataset_fn(seed, workload.model), lambda: next(sampled))
    algorithm, marker = _pfl_classes(timing)
    algorithm.run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=rounds,
            evaluation_frequency=1,
            train_cohort_size=workload.clients_per_round,
            val_cohort_size=None,
        ),
        backend=SimulatedBackend(users, users, postprocessors=[WeightByDatapoints()]),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=workload.local_epochs,
            local_learning_rate=LR,
            local_batch_size=BATCH_SIZE,
        ),
        callbacks=[marker],
    )
    timing.final_state = {k: v.detach().clone() for k, v in net.net.state_dict().items()}
    return timing.finish()


def _pfl_user_dataset_fn(seed: int, model: str) -> Callable[[tuple[int, int]], Any]:
    """Return pfl's ``make_dataset_fn``: a ``(round, client)`` user's shuffled data."""
    from pfl.data.dataset import Dataset

    def make(user: tuple[int, int]) -> Any:
        round_, client = user
        inputs, labels = client_tensors(client, model)
        shuffle = shuffle_generator(seed=seed, round_=round_, client=client)
        order = torch.randperm(len(labels), generator=shuffle)
        return Dataset(raw_data=(inputs[order], labels[order]), user_id=str(client))

    return make


def _pfl_classes(timing: Timing) -> tuple[Any, Any]:
    """Return pfl's FedAvg without per-user evaluation, and a round-marking callback."""
    import dataclasses

    from pfl.algorithm import FederatedAveraging
    from pfl.callback.base import TrainingProcessCallback
    from pfl.metrics import Metrics

    class TrainOnlyFedAvg(FederatedAveraging):
        """FedAvg that never evaluates users.

        pfl evaluates every user before and after local training in iteration 0
        whatever ``evaluation_frequency`` is; W1 has no evaluation.
        """

        def get_next_central_contexts(self, *args: Any, **kwargs: Any) -> Any:
            contexts, model, metrics = super().get_next_central_contexts(*args, **kwargs)
            if contexts is not None:
                contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
            return contexts, model, metrics

    class RoundMarker(TrainingProcessCallback):
        def on_train_begin(self, *, model: Any) -> Metrics:
            timing.mark()
            return Metrics()

        def after_central_iteration(
            self, aggregate_metrics: Metrics, model: Any, *, central_iteration: int
        ) -> tuple[bool, Metrics]:
            timing.mark()
            return False, Metrics()

    return TrainOnlyFedAvg(), RoundMarker()
