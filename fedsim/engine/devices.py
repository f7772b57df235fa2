"""Device profiles: how fast, how available and how well connected each simulated device is.

Profiles come from seeded distributions (drawn lazily per node, so a million
devices cost nothing) or from a CSV; :func:`simulated_seconds` turns a client's
measured compute time and payload into the time it would take on its device.
"""

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from flwr.app import ArrayRecord, RecordDict

from fedsim.engine.nodes import FIRST_NODE_ID
from fedsim.records import records_of
from fedsim.seeding import numpy_rng

CSV_COLUMNS = ("partition_id", "speed", "availability", "bandwidth_mbps")


@dataclass(frozen=True)
class DeviceProfile:
    """What one simulated device is like.

    Attributes
    ----------
    speed
        Compute speed relative to the machine running the simulation: 1.0 is as
        fast, 0.5 twice as slow. Measured compute seconds are divided by it.
    availability
        Probability that the device answers in a given round, in (0, 1].
    bandwidth_mbps
        Link speed in megabits per second, used for download and upload alike.
    """

    speed: float
    availability: float
    bandwidth_mbps: float

    def __post_init__(self) -> None:
        for field in fields(self):
            if problem := _field_problem(field.name, getattr(self, field.name)):
                raise ValueError(problem)


def _field_problem(name: str, value: float) -> str | None:
    """Say what is wrong with ``value`` for profile field ``name``, or return None."""
    if name == "availability":
        return None if 0.0 < value <= 1.0 else f"availability must be in (0, 1], got {value}"
    if math.isfinite(value) and value > 0.0:
        return None
    return f"{name} must be finite and > 0, got {value}"


class ProfileSource(Protocol):
    """Anything that tells the profile of a node; asked again whenever needed."""

    def profile(self, node_id: int) -> DeviceProfile:
        """Return the profile of ``node_id``; the same one every time."""
        ...


class SampledProfiles:
    """Profiles drawn per node, lazily, from seeded distributions.

    A node's profile is drawn from a generator keyed by ``(seed, node)`` alone, so
    it is the same whenever, wherever and in whatever order it is asked, and a
    population of a million nodes costs nothing until its nodes are sampled.

    Parameters
    ----------
    seed
        Root seed of the profiles (independent of the run's other draws by purpose).
    speed_sigma
        ``speed ~ LogNormal(0, speed_sigma)``: median 1, i.e. the typical device is
        as fast as this machine and half of them are slower.
    availability_mean, availability_concentration
        ``availability ~ Beta(m c, (1 - m) c)``, whose mean is ``m`` and variance
        ``m (1 - m) / (c + 1)``: larger ``c`` makes devices more alike. Clipped
        below at 1e-3 so that every device is reachable at all. ``m = 1`` means
        always available.
    bandwidth_median_mbps, bandwidth_sigma
        ``bandwidth ~ LogNormal(log(median), sigma)``: links span orders of
        magnitude, which a log-normal captures with two numbers.
    """

    def __init__(
        self,
        *,
        seed: int,
        speed_sigma: float = 0.5,
        availability_mean: float = 0.9,
        availability_concentration: float = 10.0,
        bandwidth_median_mbps: float = 20.0,
        bandwidth_sigma: float = 1.0,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not (speed_sigma >= 0.0 and bandwidth_sigma >= 0.0):
            raise ValueError(f"sigmas must be >= 0, got {speed_sigma}, {bandwidth_sigma}")
        if not 0.0 < availability_mean <= 1.0:
            raise ValueError(f"availability_mean must be in (0, 1], got {availability_mean}")
        if not availability_concentration > 0.0:
            raise ValueError(
                f"availability_concentration must be > 0, got {availability_concentration}"
            )
        if not bandwidth_median_mbps > 0.0:
            raise ValueError(f"bandwidth_median_mbps must be > 0, got {bandwidth_median_mbps}")
        self._seed = seed
        self._speed_sigma = speed_sigma
        self._availability = (availability_mean, availability_concentration)
        self._bandwidth = (math.log(bandwidth_median_mbps), bandwidth_sigma)
        # A cohort's profiles are asked for twice per round (availability, timing);
        # a small cache saves re-seeding without growing with the population.
        self._cached = lru_cache(maxsize=4096)(self._draw)

    def profile(self, node_id: int) -> DeviceProfile:
        """Return the profile of ``node_id``."""
        return self._cached(node_id)

    def _draw(self, node_id: int) -> DeviceProfile:
        rng = numpy_rng(self._seed, 0, node_id, "device-profile")
        speed = rng.lognormal(0.0, self._speed_sigma)
        bandwidth = rng.lognormal(*self._bandwidth)
        # Availability last: a Beta draw consumes a variable number of uniforms, so
        # changing its parameters leaves every device's speed and bandwidth alone.
        mean, concentration = self._availability
        availability = 1.0
        if mean < 1.0:
            draw = rng.beta(mean * concentration, (1.0 - mean) * concentration)
            availability = min(max(float(draw), 1e-3), 1.0)
        return DeviceProfile(float(speed), availability, float(bandwidth))


class CsvProfiles:
    """Profiles read from a CSV file, one row per data partition.

    The header is ``partition_id,speed,availability,bandwidth_mbps`` (other
    columns are ignored), so measured device traces can be replayed. The file is
    read and checked once, at construction: a mistake names its file, line and
    column instead of surfacing rounds later.

    Parameters
    ----------
    path
        The CSV file; node ``n`` reads the row of partition ``n - FIRST_NODE_ID``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            text = self.path.read_text(encoding="utf-8-sig")  # Excel writes a BOM
        except OSError as exc:
            raise ValueError(f"{self.path}: cannot read device profiles ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{self.path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start]:#04x})"
            ) from None
        self._profiles = _parse_profiles(text.splitlines(), where=str(self.path))

    def __len__(self) -> int:
        return len(self._profiles)

    def profile(self, node_id: int) -> DeviceProfile:
        """Return the profile of ``node_id``; ``KeyError`` if its partition has no row."""
        partition = node_id - FIRST_NODE_ID
        try:
            return self._profiles[partition]
        except KeyError:
            raise KeyError(
                f"partition_id {partition} (node {node_id}) is not in {self.path}"
            ) from None


def _parse_profiles(lines: Iterable[str], *, where: str) -> dict[int, DeviceProfile]:
    reader = csv.DictReader(lines)
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        raise ValueError(f"{where}, line 1: {exc}") from None
    for column in CSV_COLUMNS:
        if column not in header:
            raise ValueError(f"{where}, line 1, column {column!r}: missing from the header")
    profiles: dict[int, DeviceProfile] = {}
    first_line: dict[int, int] = {}
    for row in _rows(reader, where=where):
        line = reader.line_num
        partition, profile = _parse_row(row, where=f"{where}, line {line}")
        if partition in profiles:
            raise ValueError(
                f"{where}, line {line}, column 'partition_id': "
                f"{partition} repeats line {first_line[partition]}"
            )
        profiles[partition], first_line[partition] = profile, line
    return profiles


def _rows(reader: csv.DictReader, *, where: str) -> Iterable[dict[str, str | None]]:
    """Yield the reader's rows; raise ``ValueError`` naming the line the csv module refuses."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # a field past the csv module's size limit, say
            raise ValueError(f"{where}, line {reader.line_num}: {exc}") from None


def _parse_row(row: dict[str, str | None], *, where: str) -> tuple[int, DeviceProfile]:
    """Return the partition id and profile of one CSV row; ``where`` names the line."""
    values: dict[str, float] = {}
    for column in CSV_COLUMNS[1:]:
        raw = (row.get(column) or "").strip()
        try:
            values[column] = float(raw)
        except ValueError:
            raise ValueError(f"{where}, column {column!r}: {raw!r} is not a number") from None
        if problem := _field_problem(column, values[column]):
            raise ValueError(f"{where}, column {column!r}: {problem}")
    raw = (row.get("partition_id") or "").strip()
    if not (raw.isascii() and raw.isdigit()):  # str.isdigit also takes '²', int() does not
        raise ValueError(f"{where}, column 'partition_id': {raw!r} is not an integer >= 0")
    return int(raw), DeviceProfile(**values)


def simulated_seconds(
    profile: DeviceProfile, *, compute_s: float, bytes_down: int, bytes_up: int
) -> float:
    """Return how long a round trip would take on the device ``profile`` describes.

    Compute time measured here is divided by the device's relative speed, and the
    model travels both ways over its link; latency and contention are ignored,
    which is accurate when payloads are megabytes and links are megabits.
    """
    if compute_s < 0 or bytes_down < 0 or bytes_up < 0:
        raise ValueError(f"times and sizes must be >= 0, got {compute_s}, {bytes_down}, {bytes_up}")
    transfer_s = 8.0 * (bytes_down + bytes_up) / (profile.bandwidth_mbps * 1e6)
    return compute_s / profile.speed + transfer_s


def array_bytes(content: RecordDict) -> int:
    """Return the payload bytes of every array in ``content`` (configs and metrics are noise)."""
    return sum(
        len(array.data)
        for record in records_of(content, ArrayRecord).values()
        for array in record.values()
    )
