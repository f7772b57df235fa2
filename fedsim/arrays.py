"""Flower ``Array`` <-> NumPy without going through numpy's ``.npy`` parser and writer.

Flower's ``Array`` holds a ``.npy`` file's bytes. ``Array.numpy()`` parses the
header with ``ast.literal_eval`` and ``Array(ndarray)`` writes it with
``np.save``: per array that costs more than a small model's update itself, and a
simulation does it for every client. The payload is a fixed-layout header and the
raw buffer, so :func:`decode` views the buffer directly and :func:`encode` writes
the very bytes ``np.save`` would, with the header cached per dtype and shape.
Both are tested against Flower's own conversions.
"""

import io
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord

_NPY_MAGIC = b"\x93NUMPY"
_NUMPY_STYPE = "numpy.ndarray"


def decode(array: Array) -> np.ndarray:
    """Return a read-only NumPy view of an ``Array``'s payload, without copying.

    Fortran-ordered or non-``.npy`` payloads fall back to ``Array.numpy()``.
    """
    data = array.data
    if array.stype != _NUMPY_STYPE or data[:6] != _NPY_MAGIC:
        return array.numpy()
    size_bytes = 2 if data[6] == 1 else 4  # format 1.0 has a 2-byte header length
    start = 8 + size_bytes + int.from_bytes(data[8 : 8 + size_bytes], "little")
    if b"'fortran_order': False" not in data[8:start]:
        return array.numpy()
    return np.frombuffer(data, dtype=np.dtype(array.dtype), offset=start).reshape(array.shape)


def encode(value: np.ndarray) -> Array:
    """Return ``Array(value)``: the same bytes as Flower's ``np.save`` path, faster."""
    flags = value.flags
    if value.dtype.hasobject or (flags.f_contiguous and not flags.c_contiguous):
        # np.save keeps Fortran order, and refuses object arrays: Flower's path decides.
        return Array(value)
    if not flags.c_contiguous:
        value = value.copy(order="C")  # not ascontiguousarray: it turns 0-d into 1-d
    header, dtype_name = _layout(value.dtype, value.shape)
    return _array(dtype_name, value.shape, b"".join((header, value.data)))  # one copy


def _array(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    """Return ``Array(dtype=dtype, shape=shape, stype=..., data=data)``, built directly.

    Flower's constructor sorts out its three overloads and type-checks every field
    on each call, several microseconds per array and so a good part of encoding a
    reply; the fields here are right by construction. The object holds exactly what
    the constructor would leave (``test_arrays`` compares them, and their
    serialization), so Flower treats both alike.
    """
    array = Array.__new__(Array)
    vars(array).update(dtype=dtype, shape=shape, stype=_NUMPY_STYPE, data=data)
    return array


@lru_cache(maxsize=1024)
def _layout(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[bytes, str]:
    """Return the ``.npy`` header ``np.save`` writes for a C-ordered array, and the dtype's name."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue(), str(dtype)


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Return an ArrayRecord's entries as (read-only) NumPy arrays."""
    return {name: decode(array) for name, array in record.items()}


def to_array_record(values: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Build an ArrayRecord, keeping the order of ``values``.

    ``ArrayRecord(dict_of_arrays)`` would build every ``Array`` a second time, and
    setting entries one by one type-checks each key and value again (Flower's
    typed dict builds two generic aliases per check); the entries here are
    strings and ``Array``s by construction, so they go into the record's storage
    directly, as Flower's own ``copy()`` fills it (``test_arrays`` checks the
    record is the one Flower builds).
    """
    record = ArrayRecord()
    entries = vars(record)["_data"]
    for name, value in values.items():
        entries[str(name)] = encode(np.asarray(value))
    return record
