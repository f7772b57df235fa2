"""Streaming aggregation: weighted means that hold one model, not one per client."""

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord


class InvalidReplyError(ValueError):
    """A client's reply cannot be aggregated; the strategy skips it."""


@dataclass(frozen=True)
class Term:
    """One reply's values as :meth:`WeightedMean.check` converted and checked them."""

    values: Mapping[str, np.ndarray]
    tensors: dict[str, torch.Tensor]  # views of ``values``, as the sums read them
    shapes: dict[str, tuple[int, ...]]
    weight: float


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

    def check(self, values: Mapping[str, np.ndarray], weight: float) -> Term:
        """Return ``weight * values`` checked and ready for :meth:`add_checked`.

        Raises :class:`InvalidReplyError` if the term would be rejected. A strategy
        that validates all of a reply (metrics and arrays) before adding any of it
        converts and checks each part once this way, not once to check and again
        to add.
        """
        tensors = _tensors(values)
        return Term(values, tensors, self._checked(tensors, weight), weight)

    def add(self, values: Mapping[str, np.ndarray], weight: float) -> None:
        """Add ``weight * values``; if invalid, raise and change nothing.

        A zero weight (a client without examples) is valid and contributes nothing.
        """
        self.add_checked(self.check(values, weight))

    def add_checked(self, term: Term) -> None:
        """Add a term :meth:`check` returned, unless another term fixed other shapes since."""
        if self._shapes is not None and term.shapes != self._shapes:
            raise InvalidReplyError("term was checked against other shapes than this mean's")
        if term.weight == 0:
            return
        self._shapes = term.shapes
        for name, tensor in term.tensors.items():
            if name not in self._sums:
                self._sums[name] = torch.zeros(term.shapes[name], dtype=torch.float64)
                self._dtypes[name] = np.asarray(term.values[name]).dtype
            self._sums[name].add_(tensor, alpha=term.weight)
        self.total_weight += term.weight
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        """Return the weighted mean; raise ``ValueError`` if nothing was added."""
        if self.count == 0:
            raise ValueError("no terms were added")
        return {
            name: (total / self.total_weight).numpy().astype(self._dtypes[name])
            for name, total in self._sums.items()
        }

    def _checked(
        self, terms: Mapping[str, torch.Tensor], weight: float
    ) -> dict[str, tuple[int, ...]]:
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
            raise InvalidReplyError(f"weight must be a finite number >= 0, got {weight!r}")
        shapes = self._shapes or {name: tuple(term.shape) for name, term in terms.items()}
        if terms.keys() != shapes.keys():
            missing, extra = sorted(set(shapes) - set(terms)), sorted(set(terms) - set(shapes))
            raise InvalidReplyError(
                f"entries differ from the model: missing {missing}, extra {extra}"
            )
        for name, term in terms.items():
            expected, shape = tuple(shapes[name]), tuple(term.shape)
            if shape != expected:
                raise InvalidReplyError(f"{name!r} has shape {shape}, expected {expected}")
            if not _all_finite(term):
                raise InvalidReplyError(f"{name!r} contains NaN or infinity")
        return shapes


def _tensors(values: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """View each value as a tensor without copying; they are only ever read.

    A term is converted once, for both its checks and its sum: per entry, the
    conversion costs more than a small layer's addition.
    """
    return {name: torch.from_numpy(_numeric(value)) for name, value in values.items()}


def _spend_read_only_warning() -> None:
    """Trigger, silenced, the warning torch gives once per process for read-only arrays.

    Replies decode to read-only views of their payload bytes (``fedsim.arrays.decode``),
    for which ``torch.from_numpy`` warns that writing would be undefined; nothing here
    writes. torch warns only the first time in a process, so silencing that one call
    here replaces a warnings filter around every reply's conversion, whose set-up
    costs more than the conversion itself. The price: other code in the process
    that converts a read-only array gets no warning either, as it got none once a
    reply had been aggregated.
    """
    read_only = np.frombuffer(bytes(4), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(read_only)


_spend_read_only_warning()


def _numeric(value: np.ndarray) -> np.ndarray:
    """Return ``value`` as an array torch can view (non-numeric kinds as float64)."""
    array = np.asarray(value)
    return array if array.dtype.kind in "fiub" else array.astype(np.float64)


def _all_finite(term: torch.Tensor) -> bool:
    """Whether every entry is finite, without a boolean copy of the tensor.

    A sum is finite exactly when all entries are, unless finite entries overflow
    it; only then does the exact (slower) test decide. torch sums float32 in
    float32 (one pass, vectorized), which overflows sooner than a float64 sum but
    is twice as fast where it does not.
    """
    if math.isfinite(float(term.sum())):
        return True
    return bool(torch.isfinite(term).all())


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
