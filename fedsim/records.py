"""Typed access to the records of a ``RecordDict``, without Flower's filtered views.

``RecordDict.array_records`` (and its metric/config siblings) builds a new
synchronized dict and writes every matching record back into the RecordDict on
each access; on the per-client path of a simulation that costs more than the
lookup it serves. These helpers read the RecordDict directly.
"""

from typing import TypeVar, cast

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

Record = TypeVar("Record", ArrayRecord, ConfigRecord, MetricRecord)
Number = TypeVar("Number", int, float)


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


def config_number(
    config: ConfigRecord, key: str, kind: type[Number], default: Number | None = None
) -> Number:
    """Read ``config[key]`` as ``kind`` (int or float), or ``default`` when it is missing.

    Without a default a missing key raises ``KeyError`` naming it. ConfigRecord
    values are typed as a wide union, hence the conversion.
    """
    if key not in config:
        if default is None:
            raise KeyError(f"the server's config lacks {key!r}")
        return default
    return kind(cast(float, config[key]))
