"""Train a cohort of clients as one batched computation (``torch.func.vmap``).

A round of K small-model clients costs K Python loops of tiny kernels when they
train one after another (:func:`fedsim.clients.training.train_epochs`). Here the
K copies of the global model's parameters are stacked on a leading client axis
(``torch.func.stack_module_state`` does this for K distinct models; here all
start equal) and every local step is one call of ``vmap(grad(loss))``: one
kernel per layer for the whole cohort, and K times fewer Python dispatches.

The result is each client's sequential result, not an approximation of it:

* **Same batches.** Each client's generator draws one ``randperm`` per epoch, as
  :func:`~fedsim.clients.training.shuffled_batches` does, and the order is cut
  into batches of ``batch_size``, so a client's last batch of an epoch may be short.
* **Padding that does nothing.** Clients have different numbers of batches, so
  the schedule is padded to a common ``(steps, batch_size)`` with slots that
  point at a real sample of the client but are masked out: the batch loss is
  the sum of the real samples' losses over their count, the mean the sequential
  loss takes. A step in which a client has no real sample leaves its
  parameters and momentum buffers bitwise unchanged (``torch.where``; a zero
  gradient would still decay them through weight decay and momentum).
* **The same optimizer arithmetic.** :class:`SGD` applies the operations of
  ``torch.optim.SGD`` (dampening 0, no Nesterov) in the same order.

Models whose training forward changes buffers (BatchNorm's running statistics)
or draws from torch's RNG (dropout) are refused: a batched forward cannot replay
the sequential stream of draws. :func:`cohort_refusal` says why in one line.
"""

from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedsim.clients.training import LossFn, Penalty

Params = dict[str, Tensor]


@dataclass(frozen=True)
class TrainedClient:
    """One client's result: its final state (by ``state_dict`` name) and mean minibatch loss."""

    state: dict[str, Tensor]
    loss: float


@dataclass(frozen=True)
class ClientWork:
    """One client's local work: its samples, its schedule of batches, a gradient offset.

    ``schedule`` holds each step's sample indices, shape (steps, width); -1 marks a
    padded slot (:func:`epoch_schedule`, :func:`draw_schedule`). ``offset`` is added
    to every gradient of the client (SCAFFOLD's correction c - c_p); None: nothing.
    """

    inputs: Tensor
    targets: Tensor
    schedule: Tensor
    offset: Params | None = None


def train_cohort(
    model: nn.Module,
    datasets: Sequence[Dataset],
    *,
    loss_fn: LossFn,
    lr: float,
    epochs: int,
    batch_size: int,
    generators: Sequence[torch.Generator],
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    chunk_size: int | None = None,
) -> list[TrainedClient]:
    """Train one client per dataset from ``model``'s state; return their results in order.

    This is :func:`~fedsim.clients.training.train_epochs` for a whole cohort, with
    the model checked first (:func:`cohort_refusal`).

    Parameters
    ----------
    model
        The global model. Only called functionally: its tensors are left as they
        are; it is put in training mode, as ``train_epochs`` does.
    datasets
        Each client's ``(input, target)`` samples.
    loss_fn
        A batch-mean loss, the mean of per-sample losses (checked on a probe batch).
    lr, momentum, weight_decay
        Those of ``torch.optim.SGD``.
    epochs, batch_size
        Those of :func:`fedsim.clients.training.train_epochs`.
    generators
        One per client, consumed as the sequential path consumes its shuffle
        generator: one ``randperm`` per epoch.
    chunk_size
        Train at most this many clients at once (memory budget); None: all.

    Raises
    ------
    ValueError
        If the model or loss cannot be trained exactly in a cohort; the generators
        are then untouched, so the caller can fall back to the sequential path.
    """
    if len(generators) != len(datasets):
        raise ValueError(f"need one generator per dataset, got {len(generators)}, {len(datasets)}")
    if batch_size < 1 or epochs < 0 or (chunk_size is not None and chunk_size < 1):
        raise ValueError(f"need batch_size >= 1, epochs >= 0, chunk_size >= 1 or None; got "
                         f"{batch_size}, {epochs}, {chunk_size}")  # fmt: skip
    device = next(model.parameters()).device
    data = [client_tensors(dataset, device) for dataset in datasets]
    if nonempty := [pair for pair in data if len(pair[1])]:
        inputs, targets = max(nonempty, key=lambda pair: len(pair[1]))
        reason = cohort_refusal(model, loss_fn, inputs[:batch_size], targets[:batch_size])
        if reason is not None:
            raise ValueError(f"cannot train this cohort batched: {reason}")
    work = [
        ClientWork(inputs, targets, epoch_schedule(len(targets), epochs, batch_size, generator))
        for (inputs, targets), generator in zip(data, generators, strict=True)
    ]
    size = chunk_size or len(work)
    sgd = SGD(lr, momentum=momentum, weight_decay=weight_decay)
    return [
        result
        for start in range(0, len(work), size)
        for result in train_stacked(model, work[start : start + size], loss_fn=loss_fn, sgd=sgd)
    ]


def train_stacked(
    model: nn.Module,
    clients: Sequence[ClientWork],
    *,
    loss_fn: LossFn,
    sgd: "SGD",
    penalty: Penalty | None = None,
    start: Params | None = None,
    host: bool = False,
) -> list[TrainedClient]:
    """Train ``clients`` at once from ``start`` (default: ``model``'s parameters).

    The model is not checked here (see :func:`cohort_refusal`) and is used
    functionally; its other state entries (buffers) come back as they are. A
    client's loss is the mean of its real steps' batch losses (``penalty``
    included), 0.0 for a client without steps. ``host`` returns the states on
    the CPU, copied once for the whole chunk: replies need them there, and one
    copy per client and tensor would synchronize a GPU each time.
    """
    model.train()
    if start is None:
        start = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not any(len(work.targets) for work in clients):
        params = {name: value.expand(len(clients), *value.shape) for name, value in start.items()}
        return _results(model, params, [0.0] * len(clients), host=host)
    params, totals = _train_chunk(model, loss_fn, clients, sgd, penalty, start)
    steps = [int((work.schedule >= 0).any(dim=1).sum()) for work in clients]
    # As train_epochs: the running total as a Python float over the number of steps.
    means = [total / max(count, 1) for total, count in zip(totals.tolist(), steps, strict=True)]
    return _results(model, params, means, host=host)


@dataclass(frozen=True)
class SGD:
    """``torch.optim.SGD`` (dampening 0, no Nesterov) as a pure function of stacked tensors."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> "SGD":
        """Return the SGD ``optimizer`` runs; ``ValueError`` (one line) if it runs another."""
        groups = optimizer.param_groups
        if type(optimizer) is not torch.optim.SGD or len(groups) != 1:
            name, count = type(optimizer).__name__, len(groups)
            raise ValueError(f"the client optimizer {name} (with {count} parameter groups) "
                             "is not plain torch.optim.SGD")  # fmt: skip
        group = groups[0]
        if group["nesterov"] or group["dampening"] or group["maximize"]:
            raise ValueError("the client's torch.optim.SGD uses nesterov, dampening or "
                             "maximize, which the cohort's SGD does not")  # fmt: skip
        return cls(group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"])

    def step(
        self, params: Params, grads: Params, momenta: Params | None, active: Tensor | None
    ) -> tuple[Params, Params | None]:
        """Return the parameters and momentum buffers after one step.

        Tensors carry a leading client axis; ``active`` (one bool per client) keeps
        the clients without a batch bitwise where they were (None: every client
        steps). The operations are ``torch.optim.SGD``'s, in its order. ``momenta``
        is None at the first step: like SGD's lazily created buffer, it starts as
        the direction itself (``0 * momentum + d`` could differ from ``d`` in the
        sign of a zero). Every client's real steps come first in its schedule, so
        step 0 is the first step of every client that has one.
        """
        new_params, new_momenta = {}, {}
        for name, param in params.items():
            keep = None if active is None else active.view(-1, *[1] * (param.dim() - 1))
            direction = grads[name]
            if self.weight_decay != 0:
                direction = direction.add(param, alpha=self.weight_decay)
            if self.momentum != 0:
                if momenta is not None:
                    buffer = momenta[name]
                    direction = _kept(keep, buffer.mul(self.momentum).add(direction), buffer)
                new_momenta[name] = direction
            new_params[name] = _kept(keep, param.add(direction, alpha=-self.lr), param)
        return new_params, (new_momenta if self.momentum != 0 else None)


def _kept(keep: Tensor | None, moved: Tensor, before: Tensor) -> Tensor:
    """Return ``moved`` where ``keep`` holds (everywhere for None), ``before`` elsewhere."""
    return moved if keep is None else torch.where(keep, moved, before)


def cohort_refusal(
    model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor
) -> str | None:
    """Return in one line why ``model`` cannot train in a cohort, or None if it can.

    One training-mode forward pass on ``inputs`` (real samples, doubled so that
    batch statistics exist) is watched by hooks on every submodule, innermost
    first: a module whose forward changes its own buffers or advances torch's
    RNG breaks the batched replay. The loss must be the mean of per-sample
    losses, or padding could not be masked out (class weights break this). The
    model's buffers, mode and torch's RNG are left as they were.
    """
    if not any(p.requires_grad for p in model.parameters()):
        return "the model has no trainable parameters"
    inputs, targets = torch.cat([inputs, inputs]), torch.cat([targets, targets])
    names = {module: name or "the model" for name, module in model.named_modules()}
    found: list[str] = []
    seen: dict[nn.Module, tuple[list[Tensor], list[Tensor]]] = {}

    def before(module: nn.Module, _args: tuple[object, ...]) -> None:
        seen[module] = (_rng_states(inputs.device), _own_buffers(module))

    def after(module: nn.Module, _args: tuple[object, ...], _output: object) -> None:
        rng, buffers = seen.pop(module)
        label = f"{names[module]!r} ({type(module).__name__})"
        if _changed(rng, _rng_states(inputs.device)):
            found.append(f"{label} draws from torch's RNG in training, which a batched "
                         "forward cannot replay per client")  # fmt: skip
        if _changed(buffers, _own_buffers(module)):
            found.append(f"{label} updates its buffers in training (e.g. running statistics)")

    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    was_training = model.training
    handles = [module.register_forward_pre_hook(before) for module in model.modules()]
    handles += [module.register_forward_hook(after) for module in model.modules()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda(inputs.device)):
            outputs = model.train()(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])
    if found:
        return found[0]
    with torch.no_grad():
        batch = loss_fn(outputs, targets)
        each = [loss_fn(o[None], t[None]) for o, t in zip(outputs, targets, strict=True)]
    if not torch.allclose(batch, torch.stack(each).mean(), rtol=1e-4, atol=1e-6):
        return "the loss is not the mean of per-sample losses (class weights?)"
    return None


def _train_chunk(
    model: nn.Module,
    loss_fn: LossFn,
    clients: Sequence[ClientWork],
    sgd: SGD,
    penalty: Penalty | None,
    start: Params,
) -> tuple[Params, Tensor]:
    """Train one chunk of clients; return their stacked parameters and summed batch losses."""
    count = len(clients)
    like = next(work for work in clients if len(work.targets))
    rows = max(len(work.targets) for work in clients)
    # Padded where the samples are (one copy to the model's device, not one per client).
    device = next(iter(start.values())).device
    inputs = _padded([work.inputs for work in clients], like.inputs, rows).to(device)
    targets = _padded([work.targets for work in clients], like.targets, rows).to(device)
    steps = max(len(work.schedule) for work in clients)
    width = max(work.schedule.shape[1] for work in clients)
    index = torch.full((count, steps, width), -1)
    for k, work in enumerate(clients):
        index[k, : len(work.schedule), : work.schedule.shape[1]] = work.schedule
    # Steps in which every client has a whole batch take the plain batch loss, unmasked.
    whole = (index >= 0).all(dim=2).all(dim=0).tolist()
    index = index.to(inputs.device)  # (clients, steps, width); -1: padding
    params = {name: p.expand(count, *p.shape).clone() for name, p in start.items()}
    offsets = _stacked_offsets(clients, start)
    masked_step = vmap(
        grad_and_value(_masked_mean_loss(model, loss_fn, penalty)), in_dims=(0, 0, 0, 0, None)
    )
    whole_step = vmap(grad_and_value(_batch_loss(model, loss_fn, penalty)), in_dims=(0, 0, 0, None))
    rows_of = torch.arange(count, device=inputs.device)[:, None]
    # Default dtype, as train_epochs's running total; += casts each loss into it as there.
    totals, momenta = torch.zeros(count, device=inputs.device), None
    for slots, all_real in zip(index.unbind(dim=1), whole, strict=True):  # (clients, width)
        if all_real:
            batch = inputs[rows_of, slots], targets[rows_of, slots]
            grads, losses = whole_step(params, *batch, start)
            active = None
        else:
            real, picked = slots >= 0, slots.clamp(min=0)
            batch = inputs[rows_of, picked], targets[rows_of, picked]
            grads, losses = masked_step(params, *batch, real, start)
            active = real.any(dim=1)
            losses = torch.where(active, losses, 0.0)
        if offsets is not None:
            grads = {name: grads[name] + offsets[name] for name in grads}
        params, momenta = sgd.step(params, grads, momenta, active)
        totals += losses.detach()
    return params, totals


def _stacked_offsets(clients: Sequence[ClientWork], start: Params) -> Params | None:
    """Stack the clients' gradient offsets (zeros for a client without one); None if none has."""
    if all(work.offset is None for work in clients):
        return None
    zeros = {name: torch.zeros_like(value) for name, value in start.items()}
    return {name: torch.stack([(work.offset or zeros)[name] for work in clients]) for name in start}


def _batch_loss(
    model: nn.Module, loss_fn: LossFn, penalty: Penalty | None
) -> Callable[[Params, Tensor, Tensor, Params], Tensor]:
    """Return ``(params, inputs, targets, start) -> loss``: the sequential path's batch loss."""

    def loss(params: Params, inputs: Tensor, targets: Tensor, start: Params) -> Tensor:
        value = loss_fn(functional_call(model, params, (inputs,)), targets)
        return value if penalty is None else value + penalty(params, start)

    return loss


def _masked_mean_loss(
    model: nn.Module, loss_fn: LossFn, penalty: Penalty | None
) -> Callable[[Params, Tensor, Tensor, Tensor, Params], Tensor]:
    """Return ``(params, inputs, targets, real, start) -> loss``: the real samples' mean loss."""

    def per_sample(output: Tensor, target: Tensor) -> Tensor:
        return loss_fn(output[None], target[None])

    def loss(
        params: Params, inputs: Tensor, targets: Tensor, real: Tensor, start: Params
    ) -> Tensor:
        losses = vmap(per_sample)(functional_call(model, params, (inputs,)), targets)
        mean = torch.where(real, losses, 0.0).sum() / real.sum().clamp(min=1)
        return mean if penalty is None else mean + penalty(params, start)

    return loss


def epoch_schedule(size: int, epochs: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """Return each step's samples, shape (steps, batch_size); -1 pads each epoch's last batch.

    One ``randperm`` per epoch from ``generator``, cut into batches: the draws and
    batches of :func:`~fedsim.clients.training.shuffled_batches`.
    """
    batches = -(-size // batch_size)
    slots = torch.full((epochs, batches * batch_size), -1, dtype=torch.long)
    for epoch in range(epochs):
        slots[epoch, :size] = torch.randperm(size, generator=generator)
    return slots.view(epochs * batches, batch_size)


def draw_schedule(size: int, steps: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """Return ``steps`` batches of distinct samples, shape (steps, width).

    The draws of :meth:`fedsim.clients.local_routines.LocalData.batch`: one
    ``randperm(size)[:batch_size]`` per step, or every sample in order (no draw)
    when ``batch_size`` is 0 or at least ``size``.
    """
    if batch_size <= 0 or batch_size >= size:
        return torch.arange(size).expand(steps, size).clone()
    draws = [torch.randperm(size, generator=generator)[:batch_size] for _ in range(steps)]
    return torch.stack(draws) if draws else torch.empty((0, batch_size), dtype=torch.long)


def client_tensors(dataset: Dataset, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Return a client's samples as ``(inputs, targets)``, collated as its batches would be.

    They are moved to ``device``; None leaves them where they are (a cohort's samples
    go to the model's device in one copy, see :func:`train_stacked`).
    """
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        inputs, targets = dataset.tensors
    elif len(cast(Sized, dataset)) == 0:
        return torch.empty(0, device=device), torch.empty(0, device=device)
    else:
        inputs, targets = next(iter(DataLoader(dataset, batch_size=len(cast(Sized, dataset)))))
    return (inputs, targets) if device is None else (inputs.to(device), targets.to(device))


def _padded(parts: Sequence[Tensor], like: Tensor, rows: int) -> Tensor:
    """Stack per-client samples on a new client axis, zero-filled to ``rows`` each."""
    out = like.new_zeros((len(parts), rows, *like.shape[1:]))
    for k, part in enumerate(parts):
        if len(part):
            out[k, : len(part)] = part
    return out


def _results(
    model: nn.Module, params: Params, losses: Sequence[float], *, host: bool
) -> list[TrainedClient]:
    """Return each client's state: its trained parameters (views), the model's other entries.

    The other entries (buffers, frozen parameters) are copied once and shared;
    ``host``: everything on the CPU.
    """
    trained = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    entries = model.state_dict(keep_vars=True)
    fixed = {k: v.detach().clone() for k, v in entries.items() if id(v) not in trained}
    if host:
        params = {name: value.cpu() for name, value in params.items()}
        fixed = {name: value.cpu() for name, value in fixed.items()}
    names = {k: trained[id(v)] for k, v in entries.items() if id(v) in trained}
    return [
        TrainedClient(
            {k: params[names[k]][index] if k in names else fixed[k] for k in entries}, loss
        )
        for index, loss in enumerate(losses)
    ]


def _changed(before: Sequence[Tensor], after: Sequence[Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def _own_buffers(module: nn.Module) -> list[Tensor]:
    return [buffer.clone() for buffer in module.buffers(recurse=False)]


def _rng_states(device: torch.device) -> list[Tensor]:
    """Return the states of the torch generators a forward on ``device`` can draw from."""
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in _cuda(device))]


def _cuda(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


def per_client_bytes(model: nn.Module, batch: Tensor, rows: int) -> int:
    """Estimate the memory one client adds to a cohort: its state, data and activations.

    Its parameters are held five times (parameters, next parameters, gradients,
    momentum, offset), its ``rows`` samples once (padded), and every submodule's
    output for a ``batch`` three times (kept for the backward pass, its gradient,
    and a margin for the batched kernels' temporaries), as one probe forward pass
    measures them. An estimate for sizing chunks, not a bound.
    """
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    sample = batch[0].numel() * batch.element_size() if len(batch) else 0
    outputs = [0]

    def count(_module: nn.Module, _args: object, output: object) -> None:
        if isinstance(output, Tensor):
            outputs[0] += output.numel() * output.element_size()

    handles = [module.register_forward_hook(count) for module in model.modules()]
    try:
        with torch.no_grad():
            if len(batch):
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return 5 * parameters + rows * sample + 3 * outputs[0]
