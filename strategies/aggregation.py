"""Streaming aggregation: weighted means that hold one model, not one per client."""

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord

from fedsim.arrays import decode


class InvalidReplyError(ValueError):
    """A client's reply cannot be aggregated; the strategy skips it."""


# A term's weight times its largest magnitude stays below this, so that the float64
# sum of up to 2**32 terms (and the sum of their weights) cannot overflow.
_TERM_LIMIT = float(np.finfo(np.float64).max) / 2**32


@dataclass(frozen=True)
class Term:
    """One reply's values as :meth:`WeightedMean.check` converted and checked them."""

    values: Mapping[str, np.ndarray]
    tensors: dict[str, torch.Tensor]  # views of ``values``, as the sums read them
    shapes: dict[str, tuple[int, ...]]
    weight: float
    dtypes: dict[str, np.dtype]  # the mean's dtypes, whose range the values were checked against


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
    dtypes
        The mean's dtype of every entry (the model's); ``None`` takes the first
        term's. A term with values outside an entry's range (a float64 1e300 for
        a float32 model) is rejected: the mean's cast would make it infinite.
    """

    def __init__(
        self,
        template: Mapping[str, tuple[int, ...]] | None = None,
        *,
        dtypes: Mapping[str, np.dtype] | None = None,
    ) -> None:
        self._shapes = dict(template) if template is not None else None
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, np.dtype] = dict(dtypes) if dtypes is not None else {}
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
        dtypes = self._dtypes or {name: np.asarray(value).dtype for name, value in values.items()}
        return Term(values, tensors, self._checked(tensors, weight, dtypes), weight, dtypes)

    def add(self, values: Mapping[str, np.ndarray], weight: float) -> None:
        """Add ``weight * values``; if invalid, raise and change nothing.

        A zero weight (a client without examples) is valid and contributes nothing.
        """
        self.add_checked(self.check(values, weight))

    def add_checked(self, term: Term) -> None:
        """Add a term :meth:`check` returned, unless another term fixed other shapes since."""
        if self._shapes is not None and term.shapes != self._shapes:
            raise InvalidReplyError("term was checked against other shapes than this mean's")
        if self._dtypes and term.dtypes != self._dtypes:
            raise InvalidReplyError("term was checked against other dtypes than this mean's")
        if term.weight == 0:
            return
        self._shapes, self._dtypes = term.shapes, term.dtypes
        for name, tensor in term.tensors.items():
            if name not in self._sums:
                self._sums[name] = torch.zeros(term.shapes[name], dtype=torch.float64)
            self._sums[name].add_(tensor, alpha=float(term.weight))  # an int may exceed int64
        self.total_weight += float(term.weight)
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
        self, terms: Mapping[str, torch.Tensor], weight: float, dtypes: Mapping[str, np.dtype]
    ) -> dict[str, tuple[int, ...]]:
        if not (isinstance(weight, int | float) and finite_number(weight) and weight >= 0):
            raise InvalidReplyError(f"weight must be a finite number >= 0, got {weight!r}")
        if (shapes := self._shapes) is None:  # not "or": an empty record fixes no entries too
            shapes = {name: tuple(term.shape) for name, term in terms.items()}
        if terms.keys() != shapes.keys():
            missing, extra = sorted(set(shapes) - set(terms)), sorted(set(terms) - set(shapes))
            raise InvalidReplyError(
                f"entries differ from the model: missing {missing}, extra {extra}"
            )
        for name, term in terms.items():
            expected, shape = tuple(shapes[name]), tuple(term.shape)
            if shape != expected:
                raise InvalidReplyError(f"{name!r} has shape {shape}, expected {expected}")
            peak = _peak(term)
            if not math.isfinite(peak):
                raise InvalidReplyError(f"{name!r} contains NaN or infinity")
            if name in dtypes and peak > _largest(dtypes[name]):
                raise InvalidReplyError(f"{name!r} holds {peak:.3g}, beyond {dtypes[name]}'s range")
            if weight * peak > _TERM_LIMIT:
                raise InvalidReplyError(f"{name!r}: weight {weight:.3g} x {peak:.3g} is too large")
        return shapes


def _tensors(values: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """View each value as a tensor without copying; they are only ever read.

    A term is converted once, for both its checks and its sum: per entry, the
    conversion costs more than a small layer's addition.
    """
    return {name: torch.from_numpy(_numeric(name, value)) for name, value in values.items()}


def reply_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Return a reply's arrays as numeric NumPy arrays; raise ``InvalidReplyError`` naming one.

    A client's payload can be anything: bytes that are no ``.npy`` file, a shape or
    dtype that lies about them, strings, complex numbers. Each is refused here,
    once, rather than by whatever reads it first.
    """
    values = {}
    for name, array in record.items():
        try:
            value = decode(array)
        except Exception as exc:  # noqa: BLE001 - NumPy and Flower raise several kinds
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise InvalidReplyError(
                f"{name!r} is not a readable array ({type(exc).__name__}: {reason})"
            ) from None
        values[name] = _numeric(name, value)
    return values


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


def _numeric(name: str, value: np.ndarray) -> np.ndarray:
    """Return ``value`` as an array torch can view; raise ``InvalidReplyError`` if not numbers.

    Booleans, integers and floats are numbers; strings, complex numbers, dates and
    records are not. A byte order other than the machine's (torch views only
    native ones) and extended precision (torch has no such type) are converted.
    """
    array = np.asarray(value)
    kind = array.dtype.kind
    if kind not in "fiub":
        raise InvalidReplyError(f"{name!r} has dtype {array.dtype}, not a number type")
    if kind == "f" and array.dtype.itemsize > 8:
        return array.astype(np.float64)  # an overflow to inf is refused as non-finite
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


_NO_AMINMAX = (torch.uint16, torch.uint32, torch.uint64)


def _peak(term: torch.Tensor) -> float:
    """Return the largest magnitude of ``term`` (NaN if it holds one, 0 if empty), in one pass.

    ``aminmax`` reads the tensor once, as fast as a sum, without a copy; it
    propagates NaN.
    """
    if term.numel() == 0:
        return 0.0
    if term.dtype in _NO_AMINMAX:
        term = term.double()  # torch lacks the kernel; the bits are read once more
    low, high = torch.aminmax(term)
    return max(-float(low), float(high))


def _largest(dtype: np.dtype) -> float:
    """Return the largest magnitude an entry of ``dtype`` holds (integers: below it)."""
    if dtype.kind == "f":
        return float(np.finfo(dtype).max)
    if dtype.kind in "iu":
        return float(np.iinfo(dtype).max) - 1  # float64 rounds int64's max up to 2**63
    return math.inf  # booleans: any number casts to True or False


def finite_number(number: float) -> bool:
    """Whether ``number`` is finite; an integer too large for a float is not."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def shapes_of(record: ArrayRecord) -> dict[str, tuple[int, ...]]:
    """Return the shape of each entry of an ArrayRecord."""
    return {name: tuple(array.shape) for name, array in record.items()}


def dtypes_of(record: ArrayRecord) -> dict[str, np.dtype]:
    """Return the NumPy dtype of each entry of an ArrayRecord (the server's own model)."""
    return {name: np.dtype(array.dtype) for name, array in record.items()}


def metric_values(record: MetricRecord, *, exclude: str) -> dict[str, np.ndarray]:
    """Return a MetricRecord's numeric entries (lists as vectors), minus ``exclude``.

    Raise ``InvalidReplyError`` for an integer too large for a float.
    """
    try:
        return {n: np.asarray(v, dtype=np.float64) for n, v in record.items() if n != exclude}
    except OverflowError:
        raise InvalidReplyError("a metric is an integer too large for a float") from None


def to_metric_record(values: Mapping[str, np.ndarray]) -> MetricRecord:
    """Build a MetricRecord from scalars and vectors."""
    return MetricRecord(
        {name: v.tolist() if np.ndim(v) else float(v) for name, v in values.items()}
    )
