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
    non-finite metric or, with ``check_finite_arrays``, a NaN or Inf in its arrays;
    an ArrayRecord whose arrays differ from the instruction's of the same name)
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
        return error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, describe(exc))
    return checked_reply(message, reply, check_finite_arrays=check_finite_arrays)


def checked_reply(message: Message, reply: object, *, check_finite_arrays: bool = True) -> Message:
    """Return ``reply`` to ``message``, or the error reply that replaces it (see above)."""
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
    try:
        bad = non_finite_array(reply.content) if check_finite_arrays else None
    except UnreadableArrayError as exc:  # bytes that are no array: a client's bug, not ours
        return error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(exc))
    if bad:
        return error_reply(
            message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"non-finite values in array {bad}"
        )
    if mismatch := mismatched_arrays(message.content, reply.content):
        return error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, mismatch)
    return reply


def error_reply(message: Message, code: int, reason: str) -> Message:
    """Return an error reply to ``message``."""
    return Message(Error(code=code, reason=reason), reply_to=message)


def describe(exc: Exception) -> str:
    """One line naming the exception and where in the client it was raised."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {exc} (at {frame.filename}:{frame.lineno})"


def _non_finite_metric(content: RecordDict) -> str | None:
    for record in records_of(content, MetricRecord).values():
        for name, value in record.items():
            values = value if isinstance(value, list) else [value]
            if not all(_finite(v) for v in values):
                return name
    return None


def _finite(value: object) -> bool:
    """Whether a metric is a finite number; an integer beyond float64's range is not."""
    try:
        return math.isfinite(value) if isinstance(value, int | float) else True
    except OverflowError:
        return False


class UnreadableArrayError(ValueError):
    """A reply's array holds bytes that are no array of its dtype and shape."""


def non_finite_array(content: RecordDict) -> str | None:
    """Name the first array (``record/entry``) holding a NaN or an Inf, if any.

    Only NumPy payloads are read: raw bytes (a serialized XGBoost model, say) have
    no floats to check. A NumPy payload that cannot be read (its bytes, dtype and
    shape disagree) raises :class:`UnreadableArrayError`, in one line naming it.
    """
    for record_name, record in records_of(content, ArrayRecord).items():
        for name, array in record.items():
            if array.stype != SType.NUMPY:
                continue
            try:
                values = decode(array)
            except Exception as exc:  # noqa: BLE001 - NumPy raises several kinds
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                raise UnreadableArrayError(
                    f"malformed reply: array {record_name}/{name} cannot be read ({reason})"
                ) from None
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                return f"{record_name}/{name}"
    return None


#: Prefix of the reason of a reply whose arrays do not match the instruction's.
MALFORMED = "malformed reply"
#: Prefix of the reason of a reply the exchange's deadline cut off.
TIMEOUT = "round timeout expired"


def mismatched_arrays(sent: RecordDict, replied: RecordDict) -> str | None:
    """Say how a reply's ArrayRecord differs from the instruction's of the same name, if it does.

    An ArrayRecord of floats a client sends back under the name of one it received
    (the model under ``arrays``, SCAFFOLD's control variate) holds the same arrays: the
    same names, shapes and dtypes. Every shipped strategy keeps to it, and a reply
    that breaks it (an array missing, reshaped, cast or added) would fail the
    strategy's aggregation or, worse, slip through a lenient one. Records under new
    names (GS-WGAN's image gradients, secure aggregation's masked vectors) are the
    strategy's to check.
    """
    received = records_of(sent, ArrayRecord)
    for name, record in records_of(replied, ArrayRecord).items():
        if name not in received:
            continue
        if not received[name] or not all(_floating(a.dtype) for a in received[name].values()):
            continue  # not a model of floats: a serialized model (XGBoost's) may change size
        expected = {k: (tuple(a.shape), a.dtype) for k, a in received[name].items()}
        got = {k: (tuple(a.shape), a.dtype) for k, a in record.items()}
        if got == expected:
            continue
        if got.keys() != expected.keys():
            extra, missing = sorted(got.keys() - expected), sorted(expected.keys() - got)
            return f"{MALFORMED}: {name!r} adds {extra} and lacks {missing}"
        bad = next(k for k in expected if got[k] != expected[k])
        return f"{MALFORMED}: {name}/{bad} is {got[bad]}, sent as {expected[bad]}"
    return None


def failure_kind(error: Error) -> str:
    """Classify an error reply for the per-kind failure counts of a round.

    ``raised`` (the ClientApp raised), ``non-finite``, ``malformed`` (see
    :func:`mismatched_arrays`), ``timeout`` (the exchange's deadline passed),
    ``crashed`` (its worker process died), ``unavailable`` (a simulated device
    was offline or late) or ``other``.
    """
    reason = error.reason or ""
    if error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION:
        if reason.startswith(MALFORMED):
            return "malformed"
        return "non-finite" if reason.startswith("non-finite") else "raised"
    if error.code == ErrorCode.NODE_UNAVAILABLE:
        return "timeout" if reason.startswith(TIMEOUT) else "unavailable"
    if error.code == ErrorCode.CLIENT_APP_CRASHED:
        return "crashed"
    return "other"


def _floating(dtype: str) -> bool:
    """Whether an ``Array``'s dtype string names a floating-point type."""
    try:
        return np.dtype(dtype).kind == "f"
    except TypeError:
        return False
