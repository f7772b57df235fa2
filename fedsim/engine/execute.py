"""Running one message through a ClientApp, turning every failure into a reply."""

import math
import traceback
from copy import copy
from itertools import count

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SType

from fedsim.arrays import decode
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


def run_client_app(
    client_app: ClientApp, message: Message, context: Context, *, check_finite_arrays: bool = True
) -> Message:
    """Execute ``message`` on ``client_app``; never raise.

    Whatever goes wrong in a client (an exception, a reply to the wrong message, a
    non-finite metric or, with ``check_finite_arrays``, a NaN or Inf in its arrays)
    comes back as an error reply, which strategies count and skip, so a faulty
    client can neither crash the run nor poison the global model. Flower's runtimes
    pass arrays through unchecked, and one NaN update turns the model of every
    Flower strategy into NaN; the check costs one pass over each reply.
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
    if not reply.has_content():
        return reply
    if bad := _non_finite_metric(reply.content):
        return error_reply(
            message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"non-finite metric {bad!r}"
        )
    if check_finite_arrays and (bad := non_finite_array(reply.content)):
        return error_reply(
            message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"non-finite values in array {bad}"
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


def non_finite_array(content: RecordDict) -> str | None:
    """Name the first array (``record/entry``) holding a NaN or an Inf, if any.

    Only NumPy payloads are read: raw bytes (a serialized XGBoost model, say) have
    no floats to check.
    """
    for record_name, record in records_of(content, ArrayRecord).items():
        for name, array in record.items():
            if array.stype != SType.NUMPY:
                continue
            values = decode(array)
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                return f"{record_name}/{name}"
    return None
