"""The two ways replies reach a strategy: Flower's list in node order, or a stream.

Flower's grids return ``send_and_receive``'s replies as a list, and Flower's
strategies rely on it: the adaptive-clipping DP wrappers iterate the replies
twice (``validate_replies``, then ``list``), so a one-shot generator leaves the
second pass empty and the wrapper divides by zero. Many of them also sum float32
arrays in the order they get them, so the same replies in another order give a
model that differs in the last bits (up to 1e-6 after a few rounds). fedsim's
engines therefore answer ``send_and_receive`` with a list in *node order* (by
destination node, then by position among the messages): the same model on every
engine, whatever order the clients finished in.

A strategy whose aggregation folds each reply into a running sum and whose
result does not depend on the order (fedsim's own, which sum in float64 or in
integers) declares :class:`StreamingStrategy`; the round loop then takes replies
through :meth:`StreamingGrid.stream_replies` as they arrive, holding one at a
time: memory stays O(model) whatever the cohort size.
"""

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

from flwr.app import Message


@runtime_checkable
class StreamingGrid(Protocol):
    """A grid that can hand over replies one by one, in the order they arrive."""

    def stream_replies(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Send ``messages``; yield each reply as it arrives, one per message."""


@runtime_checkable
class StreamingStrategy(Protocol):
    """A strategy whose aggregation reads each reply once, in any order, one at a time.

    ``streams_replies`` is ``True`` for such a strategy. A wrapper around one (Flower's
    DP wrappers, for instance) is not one unless it says so itself: it gets a list.
    """

    streams_replies: bool


def streams_replies(strategy: object) -> bool:
    """Whether ``strategy`` takes its replies as a stream."""
    return isinstance(strategy, StreamingStrategy) and strategy.streams_replies is True


def in_node_order(messages: Sequence[Message], replies: Iterable[Message]) -> list[Message]:
    """Return ``replies`` as a list sorted by their instruction's node, then its position.

    ``messages`` are the instructions, which get their ids as the grid sends them:
    ``replies`` are collected first, so a lazy grid has sent every message. A reply
    to no known instruction (which a grid should not produce) goes last, in the
    order it came.
    """
    received = list(replies)
    rank = {
        message.metadata.message_id: (message.metadata.dst_node_id, position)
        for position, message in enumerate(messages)
    }
    unknown = (math.inf, math.inf)
    return sorted(received, key=lambda reply: rank.get(reply.metadata.reply_to_message_id, unknown))
