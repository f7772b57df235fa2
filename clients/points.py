"""What the gradient-based client actions share: points in, data, seeded batches, replies out.

BVR-L-SGD and its baselines (``fedsim.strategies``) evaluate the model at
explicit points (``{name: tensor}`` dicts, see ``local_routines``), so their
client actions read a point from a message rather than loading it into the
model. Each action lives with its strategy; these are the parts they share,
on the process's :class:`~fedsim.clients.TorchClient` (model, device, data).
"""

from collections.abc import Mapping, Sequence
from typing import cast
from weakref import WeakKeyDictionary

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedsim import keys
from fedsim.arrays import arrays_of, to_array_record
from fedsim.clients.cohort import ClientWork, draw_schedule
from fedsim.clients.local_routines import LocalData, Point
from fedsim.clients.torch_client import TorchClient
from fedsim.records import config_number, get_record
from fedsim.seeding import torch_generator

# Sorted parameter names of each process model ([] if it has buffers), read once per model.
_parameter_names: "WeakKeyDictionary[nn.Module, list[str]]" = WeakKeyDictionary()


def config_of(message: Message) -> ConfigRecord:
    """Return the message's config record."""
    return get_record(message.content, keys.CONFIG, ConfigRecord)


def tensors(client: TorchClient, record: ArrayRecord) -> Point:
    """Decode a record's arrays into writable tensors on the client's device."""
    return {
        name: torch.from_numpy(np.array(value)).to(client.device)
        for name, value in arrays_of(record).items()
    }


def point_of(client: TorchClient, message: Message) -> Point:
    """Decode the message's model arrays into parameter tensors on the client's device."""
    return tensors(client, get_record(message.content, keys.ARRAYS, ArrayRecord))


def model_for(client: TorchClient, point: Point) -> nn.Module:
    """Return the process's model, checked to hold exactly the parameters ``point`` names.

    Points are parameters only: a model with buffers (BatchNorm's running
    statistics) has state no gradient describes, so these strategies refuse it.
    """
    model = client.process_model()
    names = _parameter_names.get(model)
    if names is None:
        names = sorted(name for name, _ in model.named_parameters())
        names = _parameter_names[model] = names if len(model.state_dict()) == len(names) else []
    if not names or names != sorted(point):
        parameters = [name for name, _ in model.named_parameters()]
        raise ValueError(
            "gradient-based strategies need a model whose state is exactly its "
            f"parameters {parameters} (no buffers such as BatchNorm's); got {sorted(point)}"
        )
    return model


def local_data(client: TorchClient, context: Context) -> LocalData:
    """Return the node's whole partition as two tensors on the client's device."""
    inputs, targets = _tensors_of(client.partition(context))
    return LocalData(inputs.to(client.device), targets.to(client.device))


def cohort_workers(
    client: TorchClient,
    messages: Sequence[Message],
    contexts: Sequence[Context],
    *,
    steps: int,
    batch_size: int,
) -> list[tuple[int, ClientWork]]:
    """Return each worker's data and batch draws for a cohort, by message index.

    The draws are those ``local_steps`` makes (:func:`fedsim.clients.cohort.draw_schedule`
    from :func:`batch_generator`). Samples stay where the dataset holds them
    (``train_stacked`` moves the cohort's at once). A worker without samples is
    left out: its message goes through the one-at-a-time action, whose error
    reply says why.
    """
    workers = []
    for index, (message, context) in enumerate(zip(messages, contexts, strict=True)):
        inputs, targets = _tensors_of(client.partition(context))
        if len(targets):
            schedule = draw_schedule(
                len(targets), steps, batch_size, batch_generator(message, context)
            )
            workers.append((index, ClientWork(inputs, targets, schedule)))
    return workers


def batch_generator(message: Message, context: Context) -> torch.Generator:
    """Return the generator of this message's minibatch draws.

    It is keyed by (seed, round, node, message type): the exchanges of one round
    draw independent batches, and every engine draws the same ones.
    """
    config = config_of(message)
    return torch_generator(
        config_number(config, keys.SEED, int),
        config_number(config, keys.SERVER_ROUND, int),
        int(context.node_config[keys.PARTITION_ID]),
        message.metadata.message_type,
    )


def reply_with(
    message: Message,
    vectors: dict[str, Point],
    loss: float | None,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
) -> Message:
    """Reply the named points, the loss, the node's number of examples and ``metrics``.

    A loss of ``None`` (a DP query on an empty Poisson batch) is left out.
    """
    content = RecordDict({name: to_record(point) for name, point in vectors.items()})
    values: dict[str, int | float | list[int] | list[float]] = {keys.NUM_EXAMPLES: num_examples}
    if loss is not None:
        values[keys.TRAIN_LOSS] = loss
    values.update(metrics or {})
    content[keys.METRICS] = MetricRecord(values)
    return Message(content, reply_to=message)


def remember_point(context: Context, message: Message) -> None:
    """Keep the message's point as the node's previous point (SARAH's x_{t-1})."""
    # The message's own arrays: in one process they are shared, not copied.
    context.state[keys.PREVIOUS_POINT] = get_record(message.content, keys.ARRAYS, ArrayRecord)


def to_record(point: Point) -> ArrayRecord:
    """Encode a point as an ArrayRecord."""
    return to_array_record({name: value.numpy(force=True) for name, value in point.items()})


def optimizer_record(optimizer: torch.optim.Optimizer) -> ArrayRecord:
    """Encode an optimizer's per-parameter state (Adam's moments, step counts) as arrays.

    Entries are named ``"<parameter index>.<name>"``; the hyperparameters are not
    kept: whoever rebuilds the optimizer sets them (:func:`load_optimizer`).
    """
    return to_record(
        {
            f"{index}.{name}": value
            for index, state in optimizer.state_dict()["state"].items()
            for name, value in state.items()
        }
    )


def load_optimizer(optimizer: torch.optim.Optimizer, record: ArrayRecord) -> None:
    """Load the per-parameter state :func:`optimizer_record` encoded into ``optimizer``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in arrays_of(record).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = torch.from_numpy(np.array(value))
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _tensors_of(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples of a node's dataset as ``(inputs, targets)`` tensors."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        inputs, targets = dataset.tensors
        return inputs, targets
    pairs = [dataset[i] for i in range(len(cast(TensorDataset, dataset)))]
    return torch.stack([x for x, _ in pairs]), torch.as_tensor([y for _, y in pairs])
