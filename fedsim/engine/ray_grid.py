"""The Ray engine: a Flower ``Grid`` that runs the ClientApp on a pool of Ray actors.

The pool is sized from per-client resources (``num_cpus``, fractional
``num_gpus``) and the cluster's capacity, on this machine or on an existing Ray
cluster (``address``). Each exchange puts a cohort's shared content (the global
model) into the object store once, not once per client; replies stream back in
completion order into the strategy's streaming aggregation. Node contexts stay on
the driver and travel with each message, so a node's ``Context.state`` survives
across rounds whichever actor runs it next.
"""

import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from copy import copy
from dataclasses import dataclass
from typing import Any

import ray
import torch
from flwr.app import Context, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedsim.engine.execute import assign_message_id, error_reply, run_client_app
from fedsim.engine.simulated import SimulatedGrid


@dataclass(frozen=True)
class RayResources:
    """What one simulated client occupies while it runs, and how many may run at once.

    Parameters
    ----------
    num_cpus
        CPUs per client; also its torch intra-op thread count (at least 1).
    num_gpus
        GPUs per client; fractions share a GPU (0.25: four clients per GPU).
    num_actors
        Pool size; ``None`` fits as many actors as the cluster's CPUs and GPUs allow.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    num_actors: int | None = None

    def __post_init__(self) -> None:
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(
                f"num_cpus must be > 0 and num_gpus >= 0, got {self.num_cpus}, {self.num_gpus}"
            )
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1 or None, got {self.num_actors}")


def pool_size(resources: RayResources, cluster: Mapping[str, float]) -> int:
    """Return how many actors of ``resources`` run at once on ``cluster``.

    Raises ``ValueError`` when not even one fits, or when an explicit
    ``num_actors`` asks for more than the cluster holds (Ray would otherwise
    leave the extra actors pending forever).
    """
    fits = math.floor(cluster.get("CPU", 0.0) / resources.num_cpus + 1e-9)
    if resources.num_gpus > 0:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / resources.num_gpus + 1e-9))
    wanted = resources.num_actors if resources.num_actors is not None else fits
    if fits < 1 or wanted > fits:
        raise ValueError(
            f"the Ray cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} "
            f"GPUs; {wanted or 1} actor(s) of {resources.num_cpus:g} CPU and "
            f"{resources.num_gpus:g} GPU do not fit"
        )
    return wanted


def threads_for(num_cpus: float) -> int:
    """Return torch intra-op threads for an actor holding ``num_cpus`` CPUs.

    Torch's default (one thread per core) in every actor oversubscribes the
    machine: on 2 cores, threads spinning in OpenMP barriers stalled rounds for
    15-20 s. Each actor gets threads for its own share only.
    """
    return max(1, int(num_cpus))


class _NodeActor:
    """A Ray actor that runs messages on its own copy of the ClientApp."""

    def __init__(self, client_app: ClientApp, num_threads: int, uses_gpu: bool) -> None:
        if not uses_gpu:
            # A CPU-only actor must not grab a GPU through device "auto"; hiding them
            # here (before CUDA initializes) holds whatever Ray's default is.
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        torch.set_num_threads(num_threads)
        self._client_app = client_app
        self._content_ref: ray.ObjectRef | None = None
        self._content = RecordDict()

    def ready(self) -> bool:
        return True

    def run(
        self, metadata: Any, content: list[ray.ObjectRef], context: Context
    ) -> tuple[Message, RecordDict, float]:
        """Run one message; return the reply, the node's new state and compute seconds.

        ``content`` is the exchange's shared content as a one-element list, so that
        Ray hands over the reference instead of a freshly deserialized copy per task.
        """
        # Flower's internal constructor path: the instruction keeps its ids, so the
        # reply points back at it on the driver.
        shared = self._shared(content[0])
        message = Message(content=shared, metadata=metadata)  # type: ignore[call-overload]
        start = time.perf_counter()
        reply = run_client_app(self._client_app, message, context)
        return reply, context.state, time.perf_counter() - start

    def _shared(self, ref: ray.ObjectRef) -> RecordDict:
        """Return the content behind ``ref``, deserialized once per exchange.

        Every client of a cohort then receives the same ``Array`` objects (each its
        own shallow copy of the records), so the client's decoded-model cache hits
        from the actor's second client on, as it does inline: without this, every
        task unpickled the model and decoded and loaded it again.
        """
        if self._content_ref != ref:
            self._content, self._content_ref = ray.get(ref), ref
        return self._content


class RayGrid(SimulatedGrid):
    """Run messages on a pool of Ray actors; see the module docstring.

    Parameters
    ----------
    client_app
        The ClientApp every node runs; shipped once to each actor.
    num_nodes
        Size of the simulated population (nodes cost nothing until sampled).
    run_config
        The ``run_config`` of every node's ``Context``.
    resources
        Per-client resources and pool size.
    address
        ``None`` starts a local Ray instance (unless one is running); ``"auto"`` or
        ``"ray://host:port"`` joins an existing cluster.
    """

    def __init__(
        self,
        client_app: ClientApp,
        *,
        num_nodes: int,
        run_config: UserConfig | None = None,
        resources: RayResources | None = None,
        address: str | None = None,
        run_id: int = 1,
    ) -> None:
        start = time.perf_counter()
        super().__init__(num_nodes=num_nodes, run_config=run_config, run_id=run_id)
        self.resources = resources or RayResources()
        self._client_app = client_app
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # Ray >= 2.4x warns that it will stop hiding GPUs from num_gpus=0 actors;
            # our actors hide them themselves, so opt into that behaviour now.
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        size = pool_size(self.resources, ray.cluster_resources())
        self._actors = [self._new_actor() for _ in range(size)]
        ray.get([actor.ready.remote() for actor in self._actors])
        # The driver aggregates while the actors train: its torch ops (the streaming
        # mean's add_) must not spread over the actors' cores with spinning threads.
        self._driver_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.startup_s = time.perf_counter() - start

    def _new_actor(self) -> Any:
        actor_class = ray.remote(_NodeActor).options(
            num_cpus=self.resources.num_cpus, num_gpus=self.resources.num_gpus
        )
        return actor_class.remote(
            self._client_app, threads_for(self.resources.num_cpus), self.resources.num_gpus > 0
        )

    @property
    def num_actors(self) -> int:
        """Size of the actor pool."""
        return len(self._actors)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not supported: this engine streams replies through ``send_and_receive``."""
        raise NotImplementedError("RayGrid runs messages through send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not supported: this engine streams replies through ``send_and_receive``."""
        raise NotImplementedError("RayGrid runs messages through send_and_receive only")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Run the messages on the pool; yield replies as they finish.

        When ``timeout`` expires, unfinished messages get ``NODE_UNAVAILABLE``
        error replies and the actors still busy with them are replaced, so the
        next exchange starts on an idle pool. A crashed actor's message gets a
        ``CLIENT_APP_CRASHED`` reply and the actor is replaced.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.compute_seconds = {}
        queue = deque(messages)
        content_refs: dict[int, ray.ObjectRef] = {}  # one object-store copy per shared content
        idle = list(self._actors)
        in_flight: dict[ray.ObjectRef, tuple[Message, Any]] = {}
        while queue or in_flight:
            while queue and idle:
                message, actor = queue.popleft(), idle.pop()
                assign_message_id(message)
                ref = content_refs.get(id(message.content))
                if ref is None:
                    ref = content_refs[id(message.content)] = ray.put(message.content)
                context = self.nodes.context(message.metadata.dst_node_id)
                task = actor.run.remote(copy(message.metadata), [ref], context)
                in_flight[task] = (message, actor)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=remaining)
            if not done:
                yield from self._expire(in_flight, queue)
                return
            message, actor = in_flight.pop(done[0])
            yield self._collect(done[0], message, actor, idle)

    def _collect(self, task: Any, message: Message, actor: Any, idle: list[Any]) -> Message:
        """Turn a finished task into a reply, keeping the node's new state."""
        try:
            reply, state, seconds = ray.get(task)
        except ray.exceptions.RayActorError as exc:
            self._replace(actor)
            idle.append(self._actors[-1])
            return error_reply(message, ErrorCode.CLIENT_APP_CRASHED, f"actor died: {exc}")
        idle.append(actor)
        self.nodes.context(message.metadata.dst_node_id).state = state
        self.compute_seconds[message.metadata.message_id] = seconds
        return reply

    def _expire(
        self, in_flight: dict[Any, tuple[Message, Any]], queue: deque[Message]
    ) -> Iterator[Message]:
        for message, actor in in_flight.values():
            self._replace(actor)
            yield error_reply(message, ErrorCode.NODE_UNAVAILABLE, "round timeout expired")
        for message in queue:
            assign_message_id(message)
            yield error_reply(message, ErrorCode.NODE_UNAVAILABLE, "round timeout expired")

    def _replace(self, actor: Any) -> None:
        ray.kill(actor)
        self._actors.remove(actor)
        self._actors.append(self._new_actor())

    def shutdown(self) -> None:
        """Stop the actors, and Ray itself if this grid started it."""
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        torch.set_num_threads(self._driver_threads)
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> "RayGrid":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
