"""Client actions of BVR-L-SGD and its baselines, as named Flower message types.

One ``ClientApp`` serves every strategy: a strategy picks the routine by the
message type it sends (``train.anchor``, ``train.estimate``, ...; see
``fedsim.keys``). The point a node last took a gradient at, and SCAFFOLD's
control variate, live in ``Context.state``, so they follow the node to whichever
process runs it next.
"""

from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch.utils.data import Dataset, TensorDataset

from fedsim import keys
from fedsim.arrays import arrays_of, to_array_record
from fedsim.clients.local_routines import (
    LocalData,
    Point,
    batch_gradient,
    gradient_difference,
    local_steps,
    scaffold_steps,
)
from fedsim.clients.torch_client import TorchClient, TorchTask
from fedsim.records import config_number, get_record, records_of
from fedsim.seeding import torch_generator


class GradientClient(TorchClient):
    """A :class:`TorchClient` that also runs the gradient-based strategies' routines."""

    # Message type -> method answering it; ``fedsim.clients.client_app`` registers them.
    ACTIONS = {
        keys.TRAIN_ANCHOR: "anchor",
        keys.TRAIN_GRADIENT: "gradient",
        keys.TRAIN_ESTIMATE: "estimate",
        keys.TRAIN_LOCAL: "local",
        keys.TRAIN_SCAFFOLD: "scaffold",
    }

    def __init__(self, task: TorchTask) -> None:
        super().__init__(task)
        # Sorted parameter names of the process model ([] if it has buffers), read once.
        self._parameter_names: list[str] | None = None

    def anchor(self, message: Message, context: Context) -> Message:
        """Reply g(x; Ĩ) at the message's point and remember the point (a stage start)."""
        gradient, loss, size = self._gradient_at_message_point(message, context)
        _remember_point(context, message)
        return self._reply(message, {keys.ARRAYS: gradient}, loss, size)

    def gradient(self, message: Message, context: Context) -> Message:
        """Reply g(x; I) at the message's point (minibatch SGD)."""
        gradient, loss, size = self._gradient_at_message_point(message, context)
        return self._reply(message, {keys.ARRAYS: gradient}, loss, size)

    def estimate(self, message: Message, context: Context) -> Message:
        """Reply g(x_t; I) - g(x_{t-1}; I) on one minibatch I.

        x_{t-1} is the point this node remembered from its previous exchange; x_t
        replaces it.
        """
        config, point = self._config(message), self._point(message)
        previous_record = records_of(context.state, ArrayRecord).get(keys.PREVIOUS_POINT)
        if previous_record is None:
            raise RuntimeError(
                "this node has no previous point: it missed its stage's anchor exchange"
            )
        data = self._data(context)
        difference, loss = gradient_difference(
            self._model_of(point),
            self.task.loss_fn,
            point,
            self._tensors(previous_record),
            data.batch(
                config_number(config, keys.BATCH_SIZE, int), self._generator(message, context)
            ),
        )
        _remember_point(context, message)
        return self._reply(message, {keys.ARRAYS: difference}, loss, len(data))

    def local(self, message: Message, context: Context) -> Message:
        """Run K local steps from the message's point and reply the last point.

        With an ``estimate`` record the steps are BVR-L-SGD's LocalRoutine; without,
        they are Local SGD's.
        """
        config, point = self._config(message), self._point(message)
        estimate = records_of(message.content, ArrayRecord).get(keys.ESTIMATE)
        data = self._data(context)
        last, loss = local_steps(
            self._model_of(point),
            self.task.loss_fn,
            point,
            data,
            lr=config_number(config, keys.LR, float),
            steps=config_number(config, keys.LOCAL_STEPS, int),
            batch_size=config_number(config, keys.BATCH_SIZE, int),
            generator=self._generator(message, context),
            estimate=None if estimate is None else self._tensors(estimate),
        )
        return self._reply(message, {keys.ARRAYS: last}, loss, len(data))

    def scaffold(self, message: Message, context: Context) -> Message:
        """Run SCAFFOLD's local steps; reply Δy and Δc, keep c_p in ``Context.state``."""
        config, point = self._config(message), self._point(message)
        server_control = self._tensors(get_record(message.content, keys.CONTROL, ArrayRecord))
        stored = records_of(context.state, ArrayRecord).get(keys.CLIENT_CONTROL)
        client_control = (
            self._tensors(stored)
            if stored is not None
            else {name: torch.zeros_like(value) for name, value in point.items()}
        )
        data = self._data(context)
        delta, control_delta, new_control, loss = scaffold_steps(
            self._model_of(point),
            self.task.loss_fn,
            point,
            data,
            lr=config_number(config, keys.LR, float),
            steps=config_number(config, keys.LOCAL_STEPS, int),
            batch_size=config_number(config, keys.BATCH_SIZE, int),
            generator=self._generator(message, context),
            server_control=server_control,
            client_control=client_control,
        )
        context.state[keys.CLIENT_CONTROL] = _to_record(new_control)
        return self._reply(
            message, {keys.ARRAYS: delta, keys.CONTROL: control_delta}, loss, len(data)
        )

    def _gradient_at_message_point(
        self, message: Message, context: Context
    ) -> tuple[Point, float, int]:
        config, point = self._config(message), self._point(message)
        data = self._data(context)
        gradient, loss = batch_gradient(
            self._model_of(point),
            self.task.loss_fn,
            point,
            data.batch(
                config_number(config, keys.BATCH_SIZE, int), self._generator(message, context)
            ),
        )
        return gradient, loss, len(data)

    def _point(self, message: Message) -> Point:
        """Decode the message's model arrays into parameter tensors on this client's device."""
        return self._tensors(get_record(message.content, keys.ARRAYS, ArrayRecord))

    def _tensors(self, record: ArrayRecord) -> Point:
        return {
            name: torch.from_numpy(np.array(value)).to(self.device)
            for name, value in arrays_of(record).items()
        }

    def _model_of(self, point: Point) -> torch.nn.Module:
        """Return the process's model, checked to hold exactly the parameters ``point`` names.

        Points are parameters only: a model with buffers (BatchNorm's running
        statistics) has state no gradient describes, so these strategies refuse it.
        The model's names are read once per process; each point is checked against them.
        """
        model = self.process_model()
        if self._parameter_names is None:
            names = sorted(name for name, _ in model.named_parameters())
            self._parameter_names = names if len(model.state_dict()) == len(names) else []
        if not self._parameter_names or self._parameter_names != sorted(point):
            names = [name for name, _ in model.named_parameters()]
            raise ValueError(
                "gradient-based strategies need a model whose state is exactly its "
                f"parameters {names} (no buffers such as BatchNorm's); got {sorted(point)}"
            )
        return model

    def _data(self, context: Context) -> LocalData:
        return LocalData(*(t.to(self.device) for t in _tensors_of(self._partition(context))))

    def _config(self, message: Message) -> ConfigRecord:
        return get_record(message.content, keys.CONFIG, ConfigRecord)

    def _generator(self, message: Message, context: Context) -> torch.Generator:
        """Return the generator of this message's minibatch draws.

        It is keyed by (seed, round, node, message type): the exchanges of one
        round draw independent batches, and every engine draws the same ones.
        """
        config = self._config(message)
        partition_id = int(context.node_config[keys.PARTITION_ID])
        return torch_generator(
            config_number(config, keys.SEED, int),
            config_number(config, keys.SERVER_ROUND, int),
            partition_id,
            message.metadata.message_type,
        )

    def _reply(
        self, message: Message, vectors: dict[str, Point], loss: float, num_examples: int
    ) -> Message:
        content = RecordDict({name: _to_record(point) for name, point in vectors.items()})
        content[keys.METRICS] = MetricRecord(
            {keys.NUM_EXAMPLES: num_examples, keys.TRAIN_LOSS: loss}
        )
        return Message(content, reply_to=message)


def _remember_point(context: Context, message: Message) -> None:
    # The message's own arrays: in one process they are shared, not copied.
    context.state[keys.PREVIOUS_POINT] = get_record(message.content, keys.ARRAYS, ArrayRecord)


def _to_record(point: Point) -> ArrayRecord:
    return to_array_record({name: value.numpy(force=True) for name, value in point.items()})


def _tensors_of(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples of a node's dataset as ``(inputs, targets)`` tensors."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        inputs, targets = dataset.tensors
        return inputs, targets
    pairs = [dataset[i] for i in range(len(cast(TensorDataset, dataset)))]
    return torch.stack([x for x, _ in pairs]), torch.as_tensor([y for _, y in pairs])
