"""The Ray engine: a Flower ``Grid`` that runs the ClientApp on a pool of Ray actors.

The pool is sized from per-client resources (``num_cpus``, fractional
``num_gpus``) and the cluster's capacity, on this machine or on an existing Ray
cluster (``address``). Each exchange puts a cohort's shared content (the global
model) into the object store once, not once per client, and each actor
deserializes it once. Messages travel in batches that shrink as the exchange
empties, so Ray's per-task cost is paid a few times per actor instead of once per
client; each actor holds a second batch queued behind the one it runs, so it never
waits for the driver between batches. Replies stream back batch by batch, in
completion order, into the strategy's streaming aggregation. Node contexts stay on
the driver and travel with each message, so a node's ``Context.state`` survives
across rounds whichever actor runs it next.

Starting a pool costs what each actor imports to load the ClientApp (torch alone
takes seconds); Ray's own part is about half a second, as its workers are already
up when ``ray.init`` returns and the actors start together. A grid made with
``keep_actors=True`` hands its pool, and Ray if it started Ray, on to the next grid
of this process with the same ClientApp and resources, which then starts in
milliseconds (docs/engines.md, "Ray start-up").
"""

import hashlib
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle
import ray
import torch
from flwr.app import Context, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp

from fedsim.engine.execute import assign_message_id, run_client_app
from fedsim.engine.ray_exchange import Exchange
from fedsim.engine.simulated import SimulatedGrid, threads_for


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


class _NodeActor:
    """A Ray actor that runs messages on its own copy of the ClientApp."""

    def __init__(
        self, app_bytes: bytes, num_threads: int, uses_gpu: bool, check_finite_arrays: bool
    ) -> None:
        if not uses_gpu:
            # A CPU-only actor must not grab a GPU through device "auto"; hiding them
            # here (before CUDA initializes) holds whatever Ray's default is.
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        self._app_bytes = app_bytes
        self._num_threads = num_threads
        self._check_finite_arrays = check_finite_arrays
        self._fresh_seed = torch.initial_seed()
        self.reset()  # the first load imports what the ClientApp needs: most of start-up

    def ready(self) -> bool:
        return True

    def reset(self) -> None:
        """Start a grid as a new actor would: a new ClientApp, torch as it started.

        A kept actor serves the next grid (``keep_actors``); a new copy of the
        ClientApp drops what the last grid's clients kept in it, and the global
        RNG goes back to its state at start, so a reused actor computes what a
        new one would. Node contexts live on the driver, not here.
        """
        self._client_app: ClientApp = cloudpickle.loads(self._app_bytes)
        torch.manual_seed(self._fresh_seed)
        torch.set_num_threads(self._num_threads)
        self._content_ref: ray.ObjectRef | None = None
        self._content = RecordDict()

    def run(
        self, content: list[ray.ObjectRef], jobs: list[tuple[Any, Context]]
    ) -> list[tuple[Message, RecordDict, float]]:
        """Run a batch of messages that share ``content``, one after the other.

        ``content`` is the exchange's shared content as a one-element list, so that
        Ray hands over the reference instead of a freshly deserialized copy per task.
        Each job is a message's metadata and its node's context; each result is the
        reply, the node's new state and the client's compute seconds.
        """
        shared = self._shared(content[0])
        results = []
        for metadata, context in jobs:
            # Flower's internal constructor path: the instruction keeps its ids, so the
            # reply points back at it on the driver.
            message = Message(content=shared, metadata=metadata)  # type: ignore[call-overload]
            start = time.perf_counter()
            reply = run_client_app(
                self._client_app, message, context, check_finite_arrays=self._check_finite_arrays
            )
            results.append((reply, context.state, time.perf_counter() - start))
        return results

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


@dataclass(frozen=True)
class _PoolKey:
    """What makes an actor fit a grid: its Ray session, ClientApp and resources."""

    session: str  # Ray's job and node ids: actors die with the Ray they ran on
    app: str  # sha256 of the pickled ClientApp: equal bytes unpickle to the same app
    num_cpus: float
    num_gpus: float
    check_finite_arrays: bool


@dataclass
class _KeptPool:
    """A pool a grid handed on at shutdown (``keep_actors=True``).

    ``owns_ray``: a grid started this Ray and left it running for the pool; the
    grid that takes the pool takes over stopping it.
    """

    key: _PoolKey
    actors: list[Any]
    owns_ray: bool


#: The pool kept for the next grid of this process. One at most: kept actors hold their
#: CPUs and GPUs, so a grid that cannot use them kills them before it starts its own.
_kept: _KeptPool | None = None


def _session() -> str:
    context = ray.get_runtime_context()
    return f"{context.get_job_id()}/{context.get_node_id()}"


def _take_kept(session: str) -> _KeptPool | None:
    """Return the kept pool if it lives in ``session``; forget it either way."""
    global _kept
    kept, _kept = _kept, None
    return kept if kept is not None and kept.key.session == session else None


def _keep(pool: _KeptPool) -> None:
    """Keep ``pool``; a pool kept before it (by a grid that ran alongside) is killed."""
    global _kept
    older = _take_kept(pool.key.session)
    if older is not None:
        for actor in older.actors:
            ray.kill(actor)
        pool.owns_ray |= older.owns_ray
    _kept = pool


def release_kept_actors() -> None:
    """Kill the pool a grid kept (``keep_actors=True``), and Ray if a grid started it.

    Ray's own exit hook ends both anyway; call this to free their CPUs and GPUs
    (and memory) earlier, for other Ray work of this process.
    """
    if not ray.is_initialized():
        _take_kept("")
        return
    kept = _take_kept(_session())
    if kept is not None:
        for actor in kept.actors:
            ray.kill(actor)
        if kept.owns_ray:
            ray.shutdown()


class RayGrid(SimulatedGrid):
    """Run messages on a pool of Ray actors; see the module docstring.

    Parameters
    ----------
    client_app
        The ClientApp every node runs; pickled once, loaded once by each actor.
    num_nodes
        Size of the simulated population (nodes cost nothing until sampled).
    run_config
        The ``run_config`` of every node's ``Context``.
    resources
        Per-client resources and pool size.
    address
        ``None`` starts a local Ray instance (unless one is running); ``"auto"`` or
        ``"ray://host:port"`` joins an existing cluster.
    run_id, check_finite_arrays
        As for :class:`fedsim.engine.InlineGrid`.
    keep_actors
        At shutdown, hand the actors (and Ray, if this grid started it) on to the
        next ``RayGrid`` of this process instead of stopping them. A grid with the
        same ClientApp (equal pickled bytes) and resources then starts in
        milliseconds on them, each with a new copy of the ClientApp and torch's RNG
        and threads as at start; any other grid kills them. They hold their CPUs
        and GPUs until then, until :func:`release_kept_actors`, or until exit.

    Attributes
    ----------
    startup_s
        Seconds from the call until every actor was ready, ``ray.init`` included.
    ray_init_s
        The part of ``startup_s`` that ``ray.init`` took (0 if Ray was running).
    pool_startup_s
        The part after ``ray.init``: actors started (or reset, when kept) and ready.
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
        check_finite_arrays: bool = True,
        keep_actors: bool = False,
    ) -> None:
        start = time.perf_counter()
        super().__init__(
            num_nodes=num_nodes,
            run_config=run_config,
            run_id=run_id,
            check_finite_arrays=check_finite_arrays,
        )
        self.resources = resources or RayResources()
        self.keep_actors = keep_actors
        app_bytes = cloudpickle.dumps(client_app)
        self._owns_ray = not ray.is_initialized()
        self.ray_init_s = _start_ray(address) if self._owns_ray else 0.0
        pool_start = time.perf_counter()
        self._key = _PoolKey(
            _session(),
            hashlib.sha256(app_bytes).hexdigest(),
            self.resources.num_cpus,
            self.resources.num_gpus,
            check_finite_arrays,
        )
        self._app_ref = ray.put(app_bytes)  # one copy for every actor, replacements too
        self._actors = self._start_pool(pool_size(self.resources, ray.cluster_resources()))
        self.pool_startup_s = time.perf_counter() - pool_start
        # The driver aggregates while the actors train: its torch ops (the streaming
        # mean's add_) must not spread over the actors' cores with spinning threads.
        self._driver_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.startup_s = time.perf_counter() - start

    def _start_pool(self, size: int) -> list[Any]:
        """Return ``size`` ready actors: the kept pool's if it fits, new ones for the rest.

        New actors start at once and are awaited together; nearly all their time
        goes to the imports the ClientApp pulls in as it unpickles.
        """
        kept = _take_kept(self._key.session)
        reused: list[Any] = []
        if kept is not None:
            self._owns_ray |= kept.owns_ray
            if kept.key == self._key:
                reused = _reset_alive(kept.actors[:size])
                kept.actors = kept.actors[size:]
            for actor in kept.actors:
                ray.kill(actor)
        new = [self._new_actor() for _ in range(size - len(reused))]
        ray.get([actor.ready.remote() for actor in new])
        return reused + new

    def _new_actor(self) -> Any:
        actor_class = ray.remote(_NodeActor).options(
            num_cpus=self.resources.num_cpus, num_gpus=self.resources.num_gpus
        )
        return actor_class.remote(
            self._app_ref,
            threads_for(self.resources.num_cpus),
            self.resources.num_gpus > 0,
            self.check_finite_arrays,
        )

    @property
    def num_actors(self) -> int:
        """Size of the actor pool."""
        return len(self._actors)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the pushed messages with these ids on the pool and return their replies."""
        return list(Exchange(self, self._take_pushed(message_ids)).run(deadline=None))

    def stream_replies(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Run the messages on the pool; yield replies as their batches finish.

        Messages go out in batches that shrink as the queue empties (see
        :func:`batch_size`), so Ray's per-task cost is paid a few times per actor
        and exchange instead of once per message, while the last tasks stay short.
        Each actor holds ``ray_exchange.TASKS_PER_ACTOR`` batches at once, so it starts its next
        batch as soon as one ends instead of waiting for the driver.
        When ``timeout`` expires, the messages of unfinished batches (a batch's
        replies come back together) get ``NODE_UNAVAILABLE`` error replies and the
        actors still busy with them are replaced, so the next exchange starts on an
        idle pool. When an actor dies, the messages of its unfinished batches run
        again one per task, each on an actor with nothing else to run; the one
        that kills an actor there gets a ``CLIENT_APP_CRASHED`` reply.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.compute_seconds = {}
        queued = list(messages)
        for message in queued:
            assign_message_id(message)  # pushed messages have theirs, which replies point to
        yield from Exchange(self, queued).run(deadline)

    def _deliver(self, batch: list[Message], results: list[Any]) -> Iterator[Message]:
        """Yield a finished batch's replies, keeping each node's new state and compute time."""
        for message, (reply, state, seconds) in zip(batch, results, strict=True):
            self.nodes.keep(message.metadata.dst_node_id, state)
            self.compute_seconds[message.metadata.message_id] = seconds
            yield reply

    def _replace(self, actor: Any) -> Any:
        """Kill ``actor`` and return the new actor that takes its place in the pool."""
        ray.kill(actor)
        self._actors.remove(actor)
        self._actors.append(self._new_actor())
        return self._actors[-1]

    def shutdown(self) -> None:
        """Stop the actors, and Ray itself if this grid started it (or keep them)."""
        if not self._actors:
            return  # already shut down
        actors, self._actors = self._actors, []
        torch.set_num_threads(self._driver_threads)
        if self.keep_actors:
            _keep(_KeptPool(self._key, actors, self._owns_ray))
            return
        for actor in actors:
            ray.kill(actor)
        if self._owns_ray:
            ray.shutdown()


def _start_ray(address: str | None) -> float:
    """Start (or join) Ray for a grid; return the seconds ``ray.init`` took."""
    start = time.perf_counter()
    # Ray >= 2.4x warns that it will stop hiding GPUs from num_gpus=0 actors;
    # our actors hide them themselves, so opt into that behaviour now.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    return time.perf_counter() - start


def _reset_alive(actors: list[Any]) -> list[Any]:
    """Reset kept actors for a new grid; return those alive (a dead one is dropped)."""
    resets = [actor.reset.remote() for actor in actors]
    alive = []
    for actor, reset in zip(actors, resets, strict=True):
        try:
            ray.get(reset)
        except ray.exceptions.RayActorError:
            continue
        alive.append(actor)
    return alive
