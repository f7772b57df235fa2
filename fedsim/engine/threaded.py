"""The threads engine: a Flower ``Grid`` that runs ClientApps on worker threads of this process.

Torch releases the GIL inside its kernels, so clients training on separate
threads, each on one intra-op thread, use a machine's cores better than one
client at a time spread over all of them: on 2 cores, W1's clients train about
1.4x faster on two worker threads than inline on two torch threads. Unlike the
Ray engine there is no start-up, no worker processes and no serialization:
replies reach the strategy as they are, in completion order, while the workers
go on training.

Each worker thread holds its own copy of the ClientApp (a cloudpickle round
trip, what a Ray actor receives), so state a ClientApp keeps for its process,
such as fedsim's one model instance per ``TorchClient``, is per worker. Threads
still share the process: module globals and torch's global RNG. A client whose
randomness comes from explicit generators (fedsim's batch order and DP-SGD
noise do) computes what it computes on the inline and Ray engines, bit for bit;
draws from torch's global RNG, such as dropout's, interleave with the other
workers' and depend on timing, so such models belong on the inline or Ray engine
when runs must repeat exactly.
"""

import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import cloudpickle
import torch
from flwr.app import Context, Message, UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedsim.engine.execute import TIMEOUT, assign_message_id, error_reply, run_client_app
from fedsim.engine.simulated import SimulatedGrid

_worker = threading.local()


def on_worker_thread() -> bool:
    """Whether the caller runs on a threads-engine worker, beside other clients."""
    return getattr(_worker, "app", None) is not None


def available_cpus() -> int:
    """Return the CPUs this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ThreadedGrid(SimulatedGrid):
    """Run messages on ``num_workers`` threads, each with its own copy of ``client_app``.

    Each worker has one message running and one queued, so it never waits for the
    strategy, and at most ``2 * num_workers`` replies are alive at once whatever the
    cohort size. Messages to a node that is busy wait for it, so a node's
    ``Context`` sees its messages one at a time and in order, as on the other engines.
    While the grid is open, torch runs ``threads_per_worker`` intra-op threads (a
    process-wide setting, restored by :meth:`shutdown`): torch's default of one per
    core in every worker oversubscribes the machine.

    Parameters
    ----------
    client_app
        The ClientApp every simulated node runs; it must pickle (with cloudpickle).
    num_nodes
        Size of the population; nodes cost nothing until sampled.
    num_workers
        Clients that run at once; ``None`` takes one per available CPU.
    threads_per_worker
        Torch intra-op threads of each worker.
    run_config, run_id, check_finite_arrays
        As for :class:`fedsim.engine.InlineGrid`.
    """

    def __init__(
        self,
        client_app: ClientApp,
        *,
        num_nodes: int,
        num_workers: int | None = None,
        threads_per_worker: int = 1,
        run_config: UserConfig | None = None,
        run_id: int = 1,
        check_finite_arrays: bool = True,
    ) -> None:
        num_workers = available_cpus() if num_workers is None else num_workers
        if num_workers < 1 or threads_per_worker < 1:
            raise ValueError(
                f"num_workers and threads_per_worker must be >= 1, "
                f"got {num_workers} and {threads_per_worker}"
            )
        try:
            self._app_bytes = cloudpickle.dumps(client_app)
        except Exception as exc:  # noqa: BLE001 - any pickling failure means the same
            raise ValueError(
                f"the threads engine copies the ClientApp into each worker, but it does not "
                f"pickle: {exc}"
            ) from exc
        super().__init__(
            num_nodes=num_nodes,
            run_config=run_config,
            run_id=run_id,
            check_finite_arrays=check_finite_arrays,
        )
        self.num_workers = num_workers
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="fedsim-worker")
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads_per_worker)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the pushed messages with these ids on the workers and return their replies."""
        return list(self._exchange(deque(self._take_pushed(message_ids)), deadline=None))

    def stream_replies(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Run the messages on the workers; yield each reply as it is ready.

        ``timeout`` bounds the whole exchange: running clients cannot be
        interrupted, so those running when it expires finish, but their replies are
        late and replaced, and messages not started get a ``NODE_UNAVAILABLE``
        error reply instead of running.
        """
        queued = deque(messages)
        for message in queued:
            assign_message_id(message)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._exchange(queued, deadline=deadline)

    def shutdown(self) -> None:
        """Stop the workers (after their running clients) and restore torch's threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._torch_threads)

    def _exchange(self, queued: deque[Message], deadline: float | None) -> Iterator[Message]:
        self.compute_seconds = {}
        running: dict[Future[tuple[Message, float]], Message] = {}
        try:
            while queued or running:
                expired = deadline is not None and time.monotonic() > deadline
                if expired:
                    yield from self._expire(queued, running)
                else:
                    self._start(queued, running)
                # Past the deadline only running clients are left: wait for them, do not spin.
                left = None if deadline is None or expired else deadline - time.monotonic()
                done, _ = wait(running, timeout=left, return_when=FIRST_COMPLETED)
                late = deadline is not None and time.monotonic() > deadline
                for future in done:
                    message = running.pop(future)
                    reply, seconds = future.result()
                    self.compute_seconds[message.metadata.message_id] = seconds
                    if late:
                        reason = f"{TIMEOUT}: late reply"
                        reply = error_reply(message, ErrorCode.NODE_UNAVAILABLE, reason)
                    yield reply
        finally:  # the strategy stopped early: nothing may touch a context after this
            for future in running:
                future.cancel()
            wait(running)

    def _start(
        self, queued: deque[Message], running: dict[Future[tuple[Message, float]], Message]
    ) -> None:
        """Submit queued messages, in order, to fill the workers' slots; skip busy nodes."""
        busy = {message.metadata.dst_node_id for message in running.values()}
        held: list[Message] = []
        while queued and len(running) < 2 * self.num_workers:
            message = queued.popleft()
            node = message.metadata.dst_node_id
            if node in busy:
                held.append(message)
                continue
            busy.add(node)
            context = self.nodes.context(node)
            running[self._pool.submit(self._execute, message, context)] = message
        queued.extendleft(reversed(held))

    @staticmethod
    def _expire(
        queued: deque[Message], running: dict[Future[tuple[Message, float]], Message]
    ) -> Iterator[Message]:
        """Answer every message that has not started with a timeout error."""
        unstarted = [future for future in running if future.cancel()]
        for message in [running.pop(future) for future in unstarted] + list(queued):
            yield error_reply(message, ErrorCode.NODE_UNAVAILABLE, TIMEOUT)
        queued.clear()

    def _execute(self, message: Message, context: Context) -> tuple[Message, float]:
        """Run ``message`` on this worker's ClientApp; return the reply and the seconds."""
        if getattr(_worker, "app", None) is None:
            _worker.app = cloudpickle.loads(self._app_bytes)
        start = time.perf_counter()
        reply = run_client_app(
            _worker.app, message, context, check_finite_arrays=self.check_finite_arrays
        )
        # No two workers run one node at once (``_start`` holds busy nodes back), so
        # each node's entry has one writer.
        self.nodes.keep(context.node_id, context.state)
        return reply, time.perf_counter() - start
