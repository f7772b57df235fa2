"""Streaming aggregation: weighted means that hold one model, not one per client."""

import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord


class InvalidReplyError(ValueError):
    """A client's reply cannot be aggregated; the strategy skips it."""


class WeightedMean:
    """Running weighted mean of named arrays with fixed shapes.

    Sums accumulate in float64 (so the mean of many float32 updates loses no
    precision) and the mean is cast back to each entry's first-seen dtype. Memory
    is one float64 copy of the model, whatever the number of terms. The sums are
    torch tensors because ``sum.add_(value, alpha=weight)`` widens, scales and
    adds in one pass; NumPy needs a scaled temporary and a second pass, which on a
    small model costs a tenth of a client's training step.

    Parameters
    ----------
    template
        Expected shape of every entry; a term with other names or shapes is
        rejected before it touches the sum. ``None`` takes the first term's shapes.
    """

    def __init__(self, template: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self._shapes = dict(template) if template is not None else None
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def check(self, values: Mapping[str, np.ndarray], weight: float) -> dict[str, tuple[int, ...]]:
        """Raise :class:`InvalidReplyError` if ``add(values, weight)`` would be rejected.

        Returns the entries' shapes: the template's, or the first term's.
        """
        if not (isinstance(weight, int | float) and np.isfinite(weight) and weight >= 0):
            raise InvalidReplyError(f"weight must be a finite number >= 0, got {weight!r}")
        shapes = self._shapes or {name: np.shape(v) for name, v in values.items()}
        if set(values) != set(shapes):
            missing, extra = sorted(set(shapes) - set(values)), sorted(set(values) - set(shapes))
            raise InvalidReplyError(
                f"entries differ from the model: missing {missing}, extra {extra}"
            )
        for name, value in values.items():
            if np.shape(value) != tuple(shapes[name]):
                raise InvalidReplyError(
                    f"{name!r} has shape {np.shape(value)}, expected {tuple(shapes[name])}"
                )
            if not _all_finite(value):
                raise InvalidReplyError(f"{name!r} contains NaN or infinity")
        return shapes

    def add(self, values: Mapping[str, np.ndarray], weight: float) -> None:
        """Add ``weight * values``; if invalid, raise and change nothing.

        A zero weight (a client without examples) is valid and contributes nothing.
        """
        shapes = self.check(values, weight)
        if weight == 0:
            return
        self._shapes = shapes
        for name, value in values.items():
            if name not in self._sums:
                self._sums[name] = torch.zeros(shapes[name], dtype=torch.float64)
                self._dtypes[name] = np.asarray(value).dtype
            self._sums[name].add_(_tensor(value), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        """Return the weighted mean; raise ``ValueError`` if nothing was added."""
        if self.count == 0:
            raise ValueError("no terms were added")
        return {
            name: (total / self.total_weight).numpy().astype(self._dtypes[name])
            for name, total in self._sums.items()
        }


def _tensor(value: np.ndarray) -> torch.Tensor:
    """View ``value`` as a tensor without copying; it is only ever read.

    Replies decode to read-only views of their payload bytes, for which
    ``torch.from_numpy`` warns that writing would be undefined; nothing writes.
    """
    array = np.asarray(value)
    if array.dtype.kind not in "fiub":
        array = array.astype(np.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _all_finite(value: np.ndarray) -> bool:
    """Whether every entry is finite, without a boolean copy of the array.

    A sum is finite exactly when all entries are, unless finite entries overflow
    it; only then does the exact (slower) test decide. torch sums float32 in
    float32 (one pass, vectorized), which overflows sooner than a float64 sum but
    is twice as fast where it does not.
    """
    if math.isfinite(float(_tensor(value).sum())):
        return True
    return bool(np.all(np.isfinite(value)))


def shapes_of(record: ArrayRecord) -> dict[str, tuple[int, ...]]:
    """Return the shape of each entry of an ArrayRecord."""
    return {name: tuple(array.shape) for name, array in record.items()}


def metric_values(record: MetricRecord, *, exclude: str) -> dict[str, np.ndarray]:
    """Return a MetricRecord's numeric entries (lists as vectors), minus ``exclude``."""
    return {name: np.asarray(v, dtype=np.float64) for name, v in record.items() if name != exclude}


def to_metric_record(values: Mapping[str, np.ndarray]) -> MetricRecord:
    """Build a MetricRecord from scalars and vectors."""
    return MetricRecord(
        {name: v.tolist() if np.ndim(v) else float(v) for name, v in values.items()}
    )
