"""A model's named arrays as one flat vector, and back.

Clipping and local randomizers act on the whole update as one vector of R^d,
while models travel as ``dict[str, np.ndarray]``. :func:`flatten` records the
layout once so that :func:`unflatten` restores names, shapes and dtypes exactly.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FlatLayout:
    """Names, shapes and dtypes of the arrays a flat vector was built from, in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return sum(int(np.prod(shape)) for shape in self.shapes)


def flatten(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, FlatLayout]:
    """Concatenate ``arrays`` into one float64 vector, in the mapping's order.

    Float64 because the mechanisms' guarantees (norms, unbiasedness) are checked
    to 1e-9; :func:`unflatten` casts each entry back to its own dtype.
    """
    values = [np.asarray(value) for value in arrays.values()]
    layout = FlatLayout(
        names=tuple(arrays),
        shapes=tuple(value.shape for value in values),
        dtypes=tuple(value.dtype for value in values),
    )
    if not values:
        return np.zeros(0), layout
    return np.concatenate([value.ravel() for value in values]).astype(np.float64), layout


def unflatten(vector: np.ndarray, layout: FlatLayout) -> dict[str, np.ndarray]:
    """Split ``vector`` back into the named arrays ``layout`` describes."""
    if vector.shape != (layout.size,):
        raise ValueError(f"expected a vector of length {layout.size}, got shape {vector.shape}")
    arrays, start = {}, 0
    for name, shape, dtype in zip(layout.names, layout.shapes, layout.dtypes, strict=True):
        stop = start + int(np.prod(shape))
        arrays[name] = vector[start:stop].reshape(shape).astype(dtype)
        start = stop
    return arrays
