"""fedsim's Array codec against Flower's own: same bytes out, same arrays in."""

import numpy as np
import pytest
from flwr.app import Array

from fedsim.arrays import decode, encode

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
def test_encode_writes_the_bytes_flower_writes(value: np.ndarray) -> None:
    ours, flowers = encode(value), Array(value)
    assert ours.data == flowers.data
    assert (ours.dtype, tuple(ours.shape), ours.stype) == (
        flowers.dtype,
        tuple(flowers.shape),
        flowers.stype,
    )


@pytest.mark.parametrize("value", LAYOUTS, ids=IDS)
def test_decode_reads_what_flower_reads(value: np.ndarray) -> None:
    array = Array(value)
    fast, reference = decode(array), array.numpy()
    assert fast.dtype == reference.dtype and fast.shape == reference.shape
    np.testing.assert_array_equal(fast, reference)
