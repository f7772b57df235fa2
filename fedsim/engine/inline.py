"""The inline engine: a Flower ``Grid`` that runs the ClientApp in this process."""

import time
from collections.abc import Iterable, Iterator

import torch
from flwr.app import Message, UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedsim.engine.execute import TIMEOUT, assign_message_id, error_reply, run_client_app
from fedsim.engine.simulated import SimulatedGrid


class InlineGrid(SimulatedGrid):
    """Run every message on ``client_app`` in the calling thread, in order.

    Messages are never serialized: the client reads the server's arrays directly
    and its reply object is handed to the strategy as it is. Streamed replies are
    produced lazily as the strategy iterates them, so a streaming aggregator holds
    one reply at a time and memory stays O(model) whatever the cohort size.

    Parameters
    ----------
    client_app
        The ClientApp every simulated node runs.
    num_nodes
        Size of the population; nodes cost nothing until sampled.
    run_config
        The ``run_config`` every node's ``Context`` carries.
    run_id
        Id of the run, as a SuperLink would assign it.
    torch_threads
        Torch intra-op threads while the grid is open (restored by
        :meth:`shutdown`); ``None`` keeps the process's setting, which is what a
        plain PyTorch loop uses. One thread is much faster for small models on a
        few cores, where torch's threads spin in barriers between tiny kernels.
    check_finite_arrays
        Refuse replies whose arrays hold a NaN or an Inf (error replies).
    """

    def __init__(
        self,
        client_app: ClientApp,
        *,
        num_nodes: int,
        run_config: UserConfig | None = None,
        run_id: int = 1,
        torch_threads: int | None = None,
        check_finite_arrays: bool = True,
    ) -> None:
        super().__init__(
            num_nodes=num_nodes,
            run_config=run_config,
            run_id=run_id,
            check_finite_arrays=check_finite_arrays,
        )
        self._client_app = client_app
        self._torch_threads = torch.get_num_threads()
        if torch_threads is not None:
            if torch_threads < 1:
                raise ValueError(f"torch_threads must be >= 1 or None, got {torch_threads}")
            torch.set_num_threads(torch_threads)

    def shutdown(self) -> None:
        """Restore torch's thread count."""
        torch.set_num_threads(self._torch_threads)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the pushed messages with these ids and return their replies."""
        return [self._execute(message) for message in self._take_pushed(message_ids)]

    def stream_replies(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Run each message as the returned iterator is consumed.

        ``timeout`` bounds the whole exchange: an inline client cannot be
        interrupted, so the client running when it expires finishes, but its
        reply is late and replaced, and messages not yet started get a
        ``NODE_UNAVAILABLE`` error reply instead of running.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.compute_seconds = {}
        for message in messages:
            assign_message_id(message)
            if deadline is not None and time.monotonic() > deadline:
                yield error_reply(message, ErrorCode.NODE_UNAVAILABLE, TIMEOUT)
                continue
            reply = self._execute(message)
            if deadline is not None and time.monotonic() > deadline:
                reply = error_reply(message, ErrorCode.NODE_UNAVAILABLE, f"{TIMEOUT}: late reply")
            yield reply

    def _execute(self, message: Message) -> Message:
        context = self.nodes.context(message.metadata.dst_node_id)
        start = time.perf_counter()
        reply = run_client_app(
            self._client_app, message, context, check_finite_arrays=self.check_finite_arrays
        )
        self.nodes.keep(context.node_id, context.state)
        self.compute_seconds[message.metadata.message_id] = time.perf_counter() - start
        return reply
