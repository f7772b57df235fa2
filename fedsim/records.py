"""Typed access to the records of a ``RecordDict``, without Flower's filtered views.

``RecordDict.array_records`` (and its metric/config siblings) builds a new
synchronized dict and writes every matching record back into the RecordDict on
each access; on the per-client path of a simulation that costs more than the
lookup it serves. These helpers read the RecordDict directly.
"""

from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

Record = TypeVar("Record", ArrayRecord, ConfigRecord, MetricRecord)


def records_of(content: RecordDict, kind: type[Record]) -> dict[str, Record]:
    """Return the records of type ``kind``, by name, in insertion order."""
    return {name: record for name, record in content.items() if isinstance(record, kind)}


def get_record(content: RecordDict, name: str, kind: type[Record]) -> Record:
    """Return the record ``name``, which must be a ``kind``; raise ``KeyError`` naming it."""
    found = content.get(name)
    if not isinstance(found, kind):
        what = "missing" if found is None else f"a {type(found).__name__}"
        raise KeyError(f"the message's {kind.__name__} {name!r} is {what}")
    return found
