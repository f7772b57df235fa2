"""fedsim's Array codec against Flower's own: same bytes out, same arrays in."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedsim.arrays import decode, encode, to_array_record

LAYOUTS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(3.5, dtype=np.float64),
    np.zeros((0, 5), dtype=np.int64),
    np.asfortranarray(np.arange(6, dtype=np.float16).reshape(2, 3)),
    np.arange(24.0).reshape(4, 6)[:, ::2],
    np.arange(4, dtype=">f4"),
    np.array([True, False]),
]
IDS = ["float32", "scalar", "empty", "fortran", "strided", "big-endian", "bool"]


@pytest.mark.parametrize("value", LAYOUTS, ids=IDS)
def test_encode_builds_the_array_flower_builds(value: np.ndarray) -> None:
    ours, flowers = encode(value), Array(value)
    assert ours.data == flowers.data
    assert (ours.dtype, ours.shape, ours.stype) == (flowers.dtype, flowers.shape, flowers.stype)
    # Built without Flower's constructor, it must still be the same object to Flower:
    # equal, equally dirty, with the same content address and serialization.
    assert ours == flowers and type(ours) is Array
    assert ours.is_dirty and flowers.is_dirty
    assert ours.object_id == flowers.object_id
    assert ours.deflate() == flowers.deflate()
    record = ArrayRecord()
    record["x"] = ours
    assert record.object_id == ArrayRecord({"x": flowers}).object_id


@pytest.mark.parametrize("value", LAYOUTS, ids=IDS)
def test_decode_reads_what_flower_reads(value: np.ndarray) -> None:
    array = Array(value)
    fast, reference = decode(array), array.numpy()
    assert fast.dtype == reference.dtype and fast.shape == reference.shape
    np.testing.assert_array_equal(fast, reference)


def test_to_array_record_builds_the_record_flower_builds() -> None:
    values = dict(zip(["w", "b", "scalar"], LAYOUTS[:3], strict=True))
    ours, flowers = to_array_record(values), ArrayRecord()
    for name, value in values.items():
        flowers[name] = Array(value)
    assert list(ours) == ["w", "b", "scalar"] and ours == flowers
    assert ours.is_dirty and ours.object_id == flowers.object_id
    ours["extra"] = Array(np.zeros(1))  # still Flower's typed record: checks what is set
    with pytest.raises(TypeError):
        ours["bad"] = np.zeros(1)  # type: ignore[assignment]
