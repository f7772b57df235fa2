"""A Flower ``ClientApp`` around any PyTorch model, loss and data partition."""

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
    UserConfig,
)
from torch import nn
from torch.utils.data import Dataset

from fedsim import keys
from fedsim.arrays import arrays_of, to_array_record
from fedsim.clients.cohort import (
    SGD,
    ClientWork,
    client_tensors,
    cohort_refusal,
    epoch_schedule,
    train_stacked,
)
from fedsim.clients.dp_sgd import DPSGD
from fedsim.clients.trainer import trainer_for
from fedsim.clients.training import TASK_METRICS, LossFn, Penalty, evaluate, penalized
from fedsim.data.datasets import Task
from fedsim.engine.threaded import on_worker_thread
from fedsim.records import config_number, get_record, records_of
from fedsim.seeding import GLOBAL_RNG_LOCK, derive_seed, seeded_torch_rng, torch_generator

if TYPE_CHECKING:  # Opacus loads only when a client trains with DP-SGD
    from opacus import GradSampleModule

OptimizerFn = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]


def sgd(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Plain SGD, the optimizer of FedAvg's paper."""
    return torch.optim.SGD(params, lr=lr)


@dataclass(frozen=True)
class TorchTask:
    """What a client needs to train: model, loss, data and default hyperparameters.

    Parameters
    ----------
    model_fn
        Builds a fresh model; any ``nn.Module`` whose ``state_dict`` the server holds.
    loss_fn
        Batch-mean loss, e.g. ``nn.CrossEntropyLoss()``.
    load_partition
        ``(partition_id, num_partitions) -> Dataset`` of ``(input, target)`` pairs.
    load_node_data
        A node's own data, replacing ``load_partition``: called with the node's
        whole ``node_config`` (a SuperNode's ``--node-config``, e.g.
        ``"partition-id=0 num-partitions=3 data-dir='/srv/site-a'"``), returns its
        Dataset. It runs for every message a node handles: under Flower's
        deployment engine each message is a fresh ClientApp process anyway.
    optimizer_fn
        ``(parameters, lr) -> Optimizer``; a fresh optimizer each round.
    device
        Where local training runs: ``"cpu"``, ``"cuda:0"``, ..., or ``"auto"`` to
        take the best the process sees (a Ray actor sees only its assigned GPU).
    lr, local_epochs, batch_size
        Used when the server's ConfigRecord does not set them.
    dp_sgd
        Train with DP-SGD (Opacus) instead of plain SGD: record-level privacy,
        each node's ε reported as ``dp-epsilon`` (see ``fedsim.clients.dp_sgd``).
    task
        What the targets are, which decides the evaluation metrics:
        ``"classification"`` (accuracy), ``"regression"`` (mse) or ``"next-token"``
        (accuracy and perplexity); see ``fedsim.clients.training.TASK_METRICS``.
    """

    model_fn: Callable[[], nn.Module]
    loss_fn: LossFn
    load_partition: Callable[[int, int], Dataset] | None = None
    optimizer_fn: OptimizerFn = sgd
    device: str = "cpu"
    lr: float = 0.05
    local_epochs: int = 1
    batch_size: int = 32
    dp_sgd: DPSGD | None = None
    load_node_data: Callable[[UserConfig], Dataset] | None = None
    task: Task = "classification"

    def __post_init__(self) -> None:
        if (self.load_partition is None) == (self.load_node_data is None):
            raise ValueError("TorchTask takes exactly one of load_partition and load_node_data")


class TorchClient:
    """Train and evaluate handlers for one :class:`TorchTask`.

    One model instance is built per process and reloaded from each message: a
    simulated node holds no model between messages, so thousands of nodes cost
    one model's memory.
    """

    def __init__(self, task: TorchTask) -> None:
        self.task = task
        self.device = resolve_device(task.device)
        self._model: nn.Module | None = None
        self._private_model: GradSampleModule | None = None
        # The last global model's payloads, the model's state tensors and the decoded values.
        self._loaded: (
            tuple[tuple[bytes, ...], dict[str, torch.Tensor], dict[str, torch.Tensor]] | None
        ) = None

    def model(self, arrays: ArrayRecord) -> nn.Module:
        """Return the process's model instance loaded with ``arrays``.

        In one process a whole cohort receives the same payloads (each client's
        record is a shallow copy, see ``fedsim.engine.execute.isolated_content``).
        The first client of a global model decodes it and loads it with
        ``load_state_dict``, which checks names and shapes; the cache keeps the
        decoded tensors (and the payloads, so their identity cannot be reused),
        and later clients copy them straight into the model's tensors: decoding
        and ``load_state_dict`` cost more per client than a small model's step.
        """
        model = self.process_model()
        payloads = tuple(array.data for array in arrays.values())
        loaded = self._loaded
        if (
            loaded is None
            or len(loaded[0]) != len(payloads)
            or any(a is not b for a, b in zip(loaded[0], payloads, strict=True))
        ):
            state = {
                name: torch.from_numpy(value.copy()) for name, value in arrays_of(arrays).items()
            }
            model.load_state_dict(state)
            targets = model.state_dict()
            self._loaded = (payloads, {name: targets[name] for name in state}, state)
        else:
            with torch.no_grad():
                for target, value in zip(loaded[1].values(), loaded[2].values(), strict=True):
                    target.copy_(value)
        return model

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Return the model's state tensors (live views), by the names the server sent."""
        if self._loaded is None:
            raise RuntimeError("no model was loaded in this process yet")
        return self._loaded[1]

    def private_model(self) -> "GradSampleModule":
        """Return the process model wrapped once in Opacus's per-sample gradient hooks."""
        from opacus import GradSampleModule

        if self._private_model is None:
            self._private_model = GradSampleModule(self.process_model())
        return self._private_model

    def process_model(self) -> nn.Module:
        """Return this process's one model instance, built on first use."""
        if self._model is None:
            with GLOBAL_RNG_LOCK:  # its initial draws must not land inside a seeded build
                self._model = self.task.model_fn().to(self.device)
            if on_worker_thread():  # once per model, not once per client
                _warn_if_drawing_global_rng(self._model)
        return self._model

    def train(
        self, message: Message, context: Context, *, penalty: Penalty | None = None
    ) -> Message:
        """Train the received model on this node's partition, ``penalty`` added to the loss.

        A penalty (FedProx's proximal term) is refused under DP-SGD: Opacus clips
        the loss's per-sample gradients, and the penalty's would go unclipped.
        """
        if penalty is not None and self.task.dp_sgd is not None:
            raise ValueError("a loss penalty cannot train under client.dp_sgd (it is not "
                             "clipped per sample)")  # fmt: skip
        config = get_record(message.content, keys.CONFIG, ConfigRecord)
        model = self.model(get_record(message.content, keys.ARRAYS, ArrayRecord))
        loss_fn = (
            self.task.loss_fn if penalty is None else penalized(self.task.loss_fn, model, penalty)
        )
        dataset = self.partition(context)
        partition_id = int(context.node_config[keys.PARTITION_ID])
        seed = config_number(config, keys.SEED, int, 0)
        round_ = config_number(config, keys.SERVER_ROUND, int, 0)
        optimizer = self.task.optimizer_fn(
            model.parameters(), config_number(config, keys.LR, float, self.task.lr)
        )
        trainer = trainer_for(self.task, message, context)
        # Seeding torch's global RNG per (round, node) makes a client's update (dropout)
        # independent of which clients ran before it in this process.
        with seeded_torch_rng(derive_seed(seed, round_, partition_id, "train"), self.device):
            train_loss = trainer.train_epochs(
                self,
                dataset,
                loss_fn=loss_fn,
                optimizer=optimizer,
                epochs=config_number(config, keys.LOCAL_EPOCHS, int, self.task.local_epochs),
                batch_size=config_number(config, keys.BATCH_SIZE, int, self.task.batch_size),
            )
        return self._trained_reply(
            message, self.trained_state(), len(cast(Sized, dataset)), train_loss,
            trainer.spend(context),
        )  # fmt: skip

    def train_cohort(
        self,
        messages: Sequence[Message],
        contexts: Sequence[Context],
        *,
        penalty: Penalty | None = None,
    ) -> list[Message | None]:
        """Answer a cohort's ``train`` messages (one global model, one config) at once.

        Each client's reply is what :meth:`train` (with ``penalty``) replies within
        float rounding: the same seeded batch order, the same SGD arithmetic, its own number of
        steps (see :mod:`fedsim.clients.cohort`). The vmap engine calls this only
        where :meth:`cohort_refusal` found nothing to refuse.
        """
        config = get_record(messages[0].content, keys.CONFIG, ConfigRecord)
        arrays = get_record(messages[0].content, keys.ARRAYS, ArrayRecord)
        model = self.model(arrays)
        seed = config_number(config, keys.SEED, int, 0)
        round_ = config_number(config, keys.SERVER_ROUND, int, 0)
        epochs = config_number(config, keys.LOCAL_EPOCHS, int, self.task.local_epochs)
        batch_size = config_number(config, keys.BATCH_SIZE, int, self.task.batch_size)
        sgd = self.cohort_sgd(config_number(config, keys.LR, float, self.task.lr))
        work = []
        for context in contexts:
            inputs, targets = client_tensors(self.partition(context))
            partition = int(context.node_config[keys.PARTITION_ID])
            shuffle = torch_generator(seed, round_, partition, "shuffle")
            schedule = epoch_schedule(len(targets), epochs, batch_size, shuffle)
            work.append(ClientWork(inputs, targets, schedule))
        results = train_stacked(
            model, work, loss_fn=self.task.loss_fn, sgd=sgd, penalty=penalty, host=True
        )
        return [
            self._trained_reply(
                message, {name: result.state[name] for name in arrays}, len(w.targets), result.loss
            )
            for message, result, w in zip(messages, results, work, strict=True)
        ]

    def cohort_sgd(self, lr: float) -> SGD:
        """Return the task's optimizer as the cohort's SGD; ``ValueError`` if it is no plain SGD."""
        return SGD.of(self.task.optimizer_fn(self.process_model().parameters(), lr))

    def cohort_refusal(self, context: Context) -> str | None:
        """Say in one line why this task's training cannot run as a cohort, or None.

        DP-SGD draws Poisson batches and clips per sample; an optimizer other than
        plain ``torch.optim.SGD`` has no batched form here; a model that changes
        buffers or draws from torch's RNG in training cannot be replayed per client
        (:func:`fedsim.clients.cohort.cohort_refusal`, probed on ``context``'s data).
        """
        if self.task.dp_sgd is not None:
            return "client.dp_sgd trains each client with Poisson batches and per-sample clipping"
        try:
            self.cohort_sgd(self.task.lr)
        except ValueError as exc:
            return str(exc)
        inputs, targets = client_tensors(self.partition(context), self.device)
        if not len(targets):
            return None  # nothing to probe on: a first node without data says nothing
        size = self.task.batch_size
        return cohort_refusal(
            self.process_model(), self.task.loss_fn, inputs[:size], targets[:size]
        )

    @staticmethod
    def _trained_reply(
        message: Message,
        state: Mapping[str, torch.Tensor],
        num_examples: int,
        train_loss: float,
        extra_metrics: Mapping[str, float] | None = None,
    ) -> Message:
        """Reply the trained model, the number of examples, the mean loss and ``extra_metrics``."""
        content = RecordDict(
            {
                keys.ARRAYS: to_array_record({k: t.numpy(force=True) for k, t in state.items()}),
                keys.METRICS: MetricRecord(
                    {
                        keys.NUM_EXAMPLES: num_examples,
                        keys.TRAIN_LOSS: train_loss,
                        **(extra_metrics or {}),
                    }
                ),
            }
        )
        return Message(content, reply_to=message)

    def evaluate(self, message: Message, context: Context) -> Message:
        """Evaluate the received model on this node's partition."""
        config = records_of(message.content, ConfigRecord).get(keys.CONFIG, ConfigRecord())
        model = self.model(get_record(message.content, keys.ARRAYS, ArrayRecord))
        dataset = self.partition(context)
        num_examples = len(cast(Sized, dataset))
        if num_examples == 0:
            # Label-skewed partitions can be empty; weight 0 makes the strategy ignore this reply.
            names = (keys.LOSS, *TASK_METRICS[self.task.task])
            empty = MetricRecord({keys.NUM_EXAMPLES: 0, **dict.fromkeys(names, 0.0)})
            return Message(RecordDict({keys.METRICS: empty}), reply_to=message)
        metrics = evaluate(
            model,
            dataset,
            loss_fn=self.task.loss_fn,
            batch_size=config_number(config, keys.BATCH_SIZE, int, self.task.batch_size),
            device=self.device,
            task=self.task.task,
        )
        record = MetricRecord({keys.NUM_EXAMPLES: num_examples, **metrics})
        return Message(RecordDict({keys.METRICS: record}), reply_to=message)

    def partition(self, context: Context) -> Dataset:
        """Return the node's data: its own (``load_node_data``) or its partition's."""
        if self.task.load_node_data is not None:
            return self.task.load_node_data(dict(context.node_config))
        assert self.task.load_partition is not None  # TorchTask holds one of the two
        try:
            partition_id = int(context.node_config[keys.PARTITION_ID])
            num_partitions = int(context.node_config[keys.NUM_PARTITIONS])
        except KeyError as exc:
            raise KeyError(
                f"node_config lacks {exc}; start SuperNodes with "
                f"--node-config '{keys.PARTITION_ID}=<i> {keys.NUM_PARTITIONS}=<n>'"
            ) from None
        return self.task.load_partition(partition_id, num_partitions)


def resolve_device(name: str) -> torch.device:
    """Return ``torch.device(name)``; ``"auto"`` picks CUDA, then MPS, then CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


#: Layers that draw from torch's global RNG in training.
_GLOBAL_RNG_LAYERS = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU,
)  # fmt: skip


def _warn_if_drawing_global_rng(model: nn.Module) -> None:
    """Warn that ``model``'s random layers make a threads-engine run unrepeatable.

    Worker threads share torch's one global generator, so the seed this client
    sets is not the only one its dropout masks come from.
    """
    layers = {type(m).__name__ for m in model.modules() if isinstance(m, _GLOBAL_RNG_LAYERS)}
    if layers:
        warnings.warn(
            f"the model's {', '.join(sorted(layers))} draw(s) from torch's global RNG, which "
            "the threads engine's workers share: updates depend on timing and runs do not "
            "repeat exactly; use engine inline or ray for bit-repeatable runs",
            stacklevel=2,
        )
