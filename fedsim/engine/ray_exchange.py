"""The Ray engine's exchange: batches out to the actor pool, replies back, failures settled.

Split from ``ray_grid.py``, which holds the pool: this module decides which
messages go to which actor, in batches of what size, and what a dead or late
actor's messages become.
"""

import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from copy import copy
from typing import TYPE_CHECKING, Any

import ray
from flwr.app import Message
from flwr.common.constant import ErrorCode

from fedsim.engine.devices import array_bytes
from fedsim.engine.execute import TIMEOUT, error_reply

if TYPE_CHECKING:
    from fedsim.engine.ray_grid import RayGrid

#: What one batch's replies may take in memory, on the actor and on the driver (which may
#: hold ``TASKS_PER_ACTOR`` finished batches per actor); replies are taken to be as large as
#: the content the messages carry (a model out, a model back).
BATCH_BYTES = 32 * 2**20


#: Tasks an actor holds at once. With one, an actor idled from the end of each task until the
#: driver had fetched its replies and sent the next batch (about 7 ms a task on 2 cores, half
#: a small model's client; more across a network). A second task, queued behind the first,
#: starts as soon as the actor has stored the first one's replies.
TASKS_PER_ACTOR = 2


def batch_size(queued: int, num_actors: int, payload_bytes: int) -> int:
    """Return how many queued messages the next task takes (guided self-scheduling).

    A task costs Ray a few milliseconds whatever it carries, as much as a small
    model's client; so a task takes a share of what is queued, ``queued / (2 *
    num_actors)``, large while much is left and down to one message at the end,
    where a long last task would leave the other actors idle. ``BATCH_BYTES``
    caps a batch by its replies' memory: a large model goes one message a task.
    """
    share = math.ceil(queued / (2 * num_actors))
    return max(1, min(share, BATCH_BYTES // max(payload_bytes, 1)))


class Exchange:
    """One exchange (``stream_replies``, ``pull_messages``): messages queued, each actor's tasks.

    Messages come with their ids (given at push, or by ``stream_replies``).

    Ray runs an actor's tasks one at a time, in the order they were submitted. When
    an actor dies with several tasks unfinished, which message killed it is
    ambiguous: the one it was running, or one behind it whose crash lost the
    previous task's replies on their way back. So suspects run again *alone*: one
    message per task, on an actor with nothing else to run, whose death then
    convicts that message only.
    """

    def __init__(self, grid: "RayGrid", messages: Iterable[Message]) -> None:
        self.grid = grid
        self.queue = deque(messages)
        self.alone: set[int] = set()  # ids of messages that must run in a task of their own
        self.content_refs: dict[int, tuple[ray.ObjectRef, int]] = {}  # one store copy each
        self.tasks: dict[ray.ObjectRef, tuple[list[Message], Any]] = {}  # batch, actor
        # Each actor's tasks in submission order, the actors in pool order.
        self.lines: dict[Any, deque[ray.ObjectRef]] = {a: deque() for a in grid._actors}

    def run(self, deadline: float | None) -> Iterator[Message]:
        """Dispatch and collect until every message has a reply (or ``deadline`` passes)."""
        while self.queue or self.tasks:
            self.dispatch()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(self.tasks), num_returns=1, timeout=remaining)
            if not done:
                yield from self.expire()
                return
            actor = self.tasks[done[0]][1]
            try:
                results = ray.get(done[0])
            except ray.exceptions.RayActorError as exc:
                yield from self.lost(actor, exc)
                continue
            batch = self.finish(done[0])
            self.dispatch()  # the actor's next task is queued while these replies are aggregated
            yield from self.grid._deliver(batch, results)

    def dispatch(self) -> None:
        """Give free task slots batches of queued messages that share their content."""
        while self.queue:
            lone = id(self.queue[0]) in self.alone
            actor = self.take_slot(exclusive=lone)
            if actor is None:
                return
            content = self.queue[0].content
            if id(content) not in self.content_refs:
                self.content_refs[id(content)] = (ray.put(content), array_bytes(content))
            ref, payload = self.content_refs[id(content)]
            size = 1 if lone else batch_size(len(self.queue), len(self.grid._actors), payload)
            batch = [self.queue.popleft()]
            while (
                self.queue
                and len(batch) < size
                and self.queue[0].content is content
                and id(self.queue[0]) not in self.alone
            ):
                batch.append(self.queue.popleft())
            jobs = []
            for message in batch:
                context = self.grid.nodes.context(message.metadata.dst_node_id)
                jobs.append((copy(message.metadata), context))
            task = actor.run.remote([ref], jobs)
            self.tasks[task] = (batch, actor)
            self.lines[actor].append(task)

    def take_slot(self, *, exclusive: bool) -> Any | None:
        """Return the least busy actor that can take a task, or ``None``.

        An actor takes up to ``TASKS_PER_ACTOR`` tasks; a lone message needs an
        actor with nothing else to run, and an actor running one takes nothing more.
        Ties go to the first in pool order, so every actor starts at once.
        """
        open_actors = [
            actor
            for actor, line in self.lines.items()
            if len(line) < TASKS_PER_ACTOR and not (line and (exclusive or self.lone(line[0])))
        ]
        return min(open_actors, key=lambda actor: len(self.lines[actor]), default=None)

    def lone(self, task: ray.ObjectRef) -> bool:
        """Whether ``task`` runs a lone message.

        A message joins ``alone`` only after its task has ended, so a task still in
        flight whose message is there went out as a lone one.
        """
        batch, _ = self.tasks[task]
        return id(batch[0]) in self.alone

    def finish(self, task: ray.ObjectRef) -> list[Message]:
        """Forget a task that has ended; return its batch."""
        batch, actor = self.tasks.pop(task)
        self.lines[actor].remove(task)
        return batch

    def lost(self, actor: Any, exc: Exception) -> Iterator[Message]:
        """Settle every task of a dead actor, and put a new actor in its place.

        Tasks whose replies arrived still deliver them. If a single message was
        unfinished, it killed the actor and gets a ``CLIENT_APP_CRASHED`` reply;
        otherwise every unfinished message is a suspect and runs again alone.
        """
        unfinished: list[Message] = []
        for task in list(self.lines[actor]):
            batch = self.finish(task)
            try:
                results = ray.get(task)
            except ray.exceptions.RayActorError:
                unfinished += batch
            else:
                yield from self.grid._deliver(batch, results)
        if len(unfinished) == 1:
            yield error_reply(unfinished[0], ErrorCode.CLIENT_APP_CRASHED, f"actor died: {exc}")
        else:
            self.alone.update(id(message) for message in unfinished)
            self.queue.extendleft(reversed(unfinished))
        self.replace(actor)

    def expire(self) -> Iterator[Message]:
        """Answer every unfinished message with ``NODE_UNAVAILABLE``; replace busy actors."""
        for batch, _ in self.tasks.values():
            for message in batch:
                yield error_reply(message, ErrorCode.NODE_UNAVAILABLE, TIMEOUT)
        for message in self.queue:
            yield error_reply(message, ErrorCode.NODE_UNAVAILABLE, TIMEOUT)
        for actor in {actor for _, actor in self.tasks.values()}:
            self.replace(actor)

    def replace(self, actor: Any) -> None:
        """Swap a dead or stuck actor for a new one, with no tasks yet."""
        del self.lines[actor]
        self.lines[self.grid._replace(actor)] = deque()
