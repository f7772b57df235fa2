"""The vmap engine: the inline engine, with a cohort's training as one batched computation.

Small models leave a machine idle when clients train one after another: each
local step is a handful of tiny kernels and a Python loop around them. Here the
messages of one exchange that carry the same model and config (a strategy sends
its whole cohort one content) are trained together by their action's cohort
form (``ClientAction.cohort``, :mod:`fedsim.clients.cohort`): the clients'
parameters are stacked on a leading axis and every local step is one
``vmap(grad(...))`` over them, each client on its own seeded batches, clients
with fewer batches masked so that their state does not move. Replies are each
client's sequential reply within float rounding, and go through the same checks
as every engine's (:func:`fedsim.engine.execute.checked_reply`).

What has no batched form runs one message at a time, as on the inline engine:
evaluation, message types whose action declares no cohort form, a message the
form leaves (a worker without samples), and, for the whole run, a task the
engine refuses at start-up with one line naming why (DP-SGD, client mods, an
optimizer other than plain SGD, BatchNorm's running statistics, dropout) or a
model whose batched training fails (data-dependent control flow under ``vmap``).

Cohorts are cut into chunks of ``chunk_size`` clients; 0 sizes them from the
device's free memory (a quarter of it, and on CPU at most :data:`CPU_BUDGET`; a
client's share is estimated by :func:`fedsim.clients.cohort.per_client_bytes`).
"""

import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedsim.engine.execute import TIMEOUT, assign_message_id, checked_reply, describe, error_reply
from fedsim.engine.inline import InlineGrid

if TYPE_CHECKING:  # the engine runs whatever cohort app it is given
    from fedsim.clients.client_app import CohortApp

logger = logging.getLogger(__name__)


class VmapGrid(InlineGrid):
    """Run each exchange's training messages as batched cohorts, the rest inline.

    Parameters
    ----------
    client_app
        The ClientApp every simulated node runs, for what is not batched.
    cohort_app
        Its actions' cohort forms, sharing its client (``make_apps``); None with a
        ``refusal``.
    refusal
        Why the run cannot batch, known before the grid starts (client mods); the
        engine then runs every message inline, after one line saying so.
    chunk_size
        Clients trained at once; 0 derives it from the free memory (see above).
    num_nodes, run_config, run_id, torch_threads, check_finite_arrays
        As for :class:`fedsim.engine.InlineGrid`.
    """

    def __init__(
        self,
        client_app: ClientApp,
        cohort_app: "CohortApp | None",
        *,
        num_nodes: int,
        refusal: str | None = None,
        chunk_size: int = 0,
        run_config: UserConfig | None = None,
        run_id: int = 1,
        torch_threads: int | None = None,
        check_finite_arrays: bool = True,
    ) -> None:
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0: from free memory), got {chunk_size}")
        super().__init__(
            client_app,
            num_nodes=num_nodes,
            run_config=run_config,
            run_id=run_id,
            torch_threads=torch_threads,
            check_finite_arrays=check_finite_arrays,
        )
        if refusal is None and cohort_app is None:
            raise ValueError("VmapGrid needs a cohort_app or the refusal that replaces it")
        probe = self._probe_node(cohort_app) if refusal is None else None
        refusal = refusal or cohort_app.refusal(probe)  # type: ignore[union-attr, arg-type]
        self._cohort_app = None if refusal else cohort_app
        if refusal or cohort_app is None:
            logger.warning("engine vmap: %s; clients train one at a time", refusal)
        elif chunk_size == 0 and probe is not None:
            budget = _memory_budget(cohort_app.resolve(probe).device)
            chunk_size = max(1, budget // max(cohort_app.client_bytes(probe), 1))
        self.chunk_size = chunk_size

    def _probe_node(self, cohort_app: "CohortApp") -> Context:
        """Return the context of the first of the first 16 nodes with samples (or the first).

        The model is probed on its data for what would break a batched replay.
        """
        contexts = [self.nodes.context(node) for node in self.nodes.node_ids[:16]]
        return next((c for c in contexts if cohort_app.num_samples(c)), contexts[0])

    @property
    def batching(self) -> bool:
        """Whether training messages are batched (False after a refusal or a failure)."""
        return self._cohort_app is not None

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the pushed messages with these ids and return their replies."""
        return list(self._exchange(self._take_pushed(message_ids), deadline=None))

    def stream_replies(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Run the messages, a chunk of a cohort at a time; yield replies as they are ready.

        ``timeout`` bounds the whole exchange as on the inline engine: a chunk
        that has started finishes, but replies it gives after the deadline are
        late and replaced, and messages not started get a ``NODE_UNAVAILABLE``
        error reply instead of running.
        """
        sent = list(messages)
        for message in sent:
            assign_message_id(message)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._exchange(sent, deadline=deadline)

    def _exchange(self, messages: list[Message], deadline: float | None) -> Iterator[Message]:
        self.compute_seconds = {}
        for batch in self._batches(messages):
            if deadline is not None and time.monotonic() > deadline:
                for message in batch:
                    yield error_reply(message, ErrorCode.NODE_UNAVAILABLE, TIMEOUT)
                continue
            replies = self._run_batch(batch)
            if deadline is not None and time.monotonic() > deadline:
                late = f"{TIMEOUT}: late reply"
                replies = [error_reply(m, ErrorCode.NODE_UNAVAILABLE, late) for m in batch]
            yield from replies

    def _batches(self, messages: Sequence[Message]) -> list[list[Message]]:
        """Group messages the cohort app trains together, in chunks; others one per batch.

        A group is one message type with one content (the same array payloads and
        config) sent to distinct nodes: a second message to a node runs on its own,
        after the first.
        """
        if self._cohort_app is None:
            return [[message] for message in messages]
        groups: dict[tuple[object, ...], list[Message]] = {}
        nodes: dict[tuple[object, ...], set[int]] = {}
        singles: list[list[Message]] = []
        for message in messages:
            node = message.metadata.dst_node_id
            if message.metadata.message_type not in self._cohort_app.handlers:
                singles.append([message])
                continue
            key = _content_key(message)
            if node in nodes.setdefault(key, set()):
                singles.append([message])
            else:
                nodes[key].add(node)
                groups.setdefault(key, []).append(message)
        chunks = [
            group[start : start + self.chunk_size]
            for group in groups.values()
            for start in range(0, len(group), self.chunk_size)
        ]
        return chunks + singles

    def _run_batch(self, batch: list[Message]) -> list[Message]:
        """Run one batch: through the cohort app if its type has a cohort form, else inline."""
        cohort_app = self._cohort_app
        if cohort_app is None or batch[0].metadata.message_type not in cohort_app.handlers:
            return [self._execute(message) for message in batch]
        contexts = [self.nodes.context(m.metadata.dst_node_id) for m in batch]
        start = time.perf_counter()
        try:
            answers = cohort_app(batch, contexts)
        except Exception as exc:  # noqa: BLE001 - the sequential path then says what is wrong
            logger.warning("engine vmap: batched training failed (%s); clients train one at a "
                           "time from here", describe(exc))  # fmt: skip
            self._cohort_app = None
            return [self._execute(message) for message in batch]
        share = (time.perf_counter() - start) / len(batch)
        replies = []
        for message, context, answer in zip(batch, contexts, answers, strict=True):
            if answer is None:
                replies.append(self._execute(message))
                continue
            self.nodes.keep(context.node_id, context.state)
            self.compute_seconds[message.metadata.message_id] = share
            replies.append(
                checked_reply(message, answer, check_finite_arrays=self.check_finite_arrays)
            )
        return replies


def _content_key(message: Message) -> tuple[object, ...]:
    """Identify a message's type and content: its arrays' payloads by identity, the rest by value.

    A strategy sends one content to its cohort, so payloads are the same objects;
    comparing them by identity costs nothing whatever the model's size.
    """
    key: list[object] = [message.metadata.message_type]
    content: RecordDict = message.content
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            key.append((name, tuple((k, id(a.data)) for k, a in record.items())))
        else:
            key.append((name, repr(sorted(record.items()))))
    return tuple(key)


#: The most a CPU chunk may take. Past the caches, a larger batched step costs more per
#: client than it saves: W1's CNN trained 2x slower per client in chunks of 100 than of 10.
CPU_BUDGET = 256 << 20


def _memory_budget(device: torch.device) -> int:
    """Return the bytes a chunk may take: a quarter of the free memory (CPU: at most 256 MiB)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: assume 4 GiB
        free = 4 << 30
    return min(free // 4, CPU_BUDGET)
