"""Running one message through a ClientApp, turning every failure into a reply."""

import math
import traceback
from copy import copy
from itertools import count

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedsim.records import records_of

_message_ids = count(1)


def assign_message_id(message: Message) -> None:
    """Give an instruction message an id, as a SuperLink would on push."""
    # Flower's own InMemoryGrid sets the private field the same way.
    message.metadata.__dict__["_message_id"] = f"fedsim-{next(_message_ids)}"


def isolated_content(content: RecordDict) -> RecordDict:
    """Return a copy of ``content`` that a client may mutate without harming others.

    Strategies send one RecordDict to the whole cohort. Over the network every
    client gets its own copy; in one process they would share it, so one client
    that pops an entry would corrupt its peers. A shallow copy of each record
    (Flower's ``copy()``, which skips re-checking every entry) is enough because
    ``Array`` payloads are immutable ``bytes``; keeping the very ``Array`` objects
    also lets clients recognise the cohort's shared model by its payloads.
    """
    copy = RecordDict()
    for name, record in content.items():
        copy[name] = record.copy()
    return copy


def run_client_app(client_app: ClientApp, message: Message, context: Context) -> Message:
    """Execute ``message`` on ``client_app``; never raise.

    Whatever goes wrong in a client (an exception, a reply to the wrong message, a
    non-finite metric) comes back as an error reply, which strategies count and skip,
    so a faulty client can neither crash the run nor poison the global model.
    """
    # ``metadata=`` is Flower's internal constructor path (not in its typed overloads);
    # it keeps the instruction's ids so the client's reply points back at it.
    request = Message(  # type: ignore[call-overload]
        content=isolated_content(message.content), metadata=copy(message.metadata)
    )
    try:
        reply = client_app(request, context)
    except Exception as exc:  # noqa: BLE001 - any client failure becomes a reply
        return error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, _describe(exc))
    if not isinstance(reply, Message):
        reason = f"ClientApp returned {type(reply).__name__}, expected a Message"
        return error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason)
    if reply.metadata.reply_to_message_id != message.metadata.message_id:
        reason = (
            "ClientApp replied to another message; build replies with Message(..., reply_to=msg)"
        )
        return error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason)
    if reply.has_content() and (bad := _non_finite_metric(reply.content)):
        return error_reply(
            message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"non-finite metric {bad!r}"
        )
    return reply


def error_reply(message: Message, code: int, reason: str) -> Message:
    """Return an error reply to ``message``."""
    return Message(Error(code=code, reason=reason), reply_to=message)


def _describe(exc: Exception) -> str:
    """One line naming the exception and where in the client it was raised."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {exc} (at {frame.filename}:{frame.lineno})"


def _non_finite_metric(content: RecordDict) -> str | None:
    for record in records_of(content, MetricRecord).values():
        for name, value in record.items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                return name
    return None
