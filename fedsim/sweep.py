"""A sweep over a grid of config values: ``fedsim sweep CONFIG --grid key=v1,v2 ...``.

A sweep runs the cartesian product of the grid's values, one run after another:
:func:`plan_sweep` builds and validates every point's config first, so a typo in
the grid's last value stops the sweep before its first run, and :func:`run_sweep`
runs them, going on past a failing one. Each value is a ``--set`` override
(``key=value``, read as ``--set`` reads it), so a grid accepts exactly what
``--set`` does. One run's plan (``fedsim run --dry-run``) is in :mod:`fedsim.plan`.
"""

import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedsim.config import ConfigError, RunConfig, load_config

if TYPE_CHECKING:
    from rich.table import Table

# What a run's name may hold (``RunConfig.name``); anything else in a value becomes '_'.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_GRID_EXAMPLE = "e.g. --grid data.alpha=0.1,1.0"
COMPARISON_FILE = "compare.png"
_QUOTES = "\"' "


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: its ``key=value`` settings and its validated config."""

    settings: tuple[str, ...]
    config: RunConfig


@dataclass(frozen=True)
class Sweep:
    """A config (``base``, with the sweep's ``--set`` applied) and the grid's points.

    ``overwrite``: each run replaces the run its folder holds.
    """

    base: RunConfig
    points: tuple[SweepPoint, ...]
    overwrite: bool = False

    @property
    def folder(self) -> Path:
        """Where the sweep's comparison goes: ``<output_dir>/<name>-sweep/``."""
        return Path(self.base.output_dir) / f"{self.base.name}-sweep"


@dataclass(frozen=True)
class SweepResult:
    """The points that completed and those that failed; the comparison of the completed."""

    done: list[SweepPoint]
    failed: list[SweepPoint]
    table: "Table | None"  # None: no run completed
    plot: Path | None


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Return ``--grid key=v1,v2`` specs as ``(key, [v1, v2])``; raise ``ConfigError``.

    Values are split at commas outside quotes and brackets, so a value that holds
    commas is quoted: ``--grid 'faults.kinds="raise,nan",hang'``.
    """
    if not specs:
        raise ConfigError(f"--grid: give at least one, {_GRID_EXAMPLE}")
    grid: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        values = _split_values(text) if sep else []
        if not key or not values or any(not value for value in values):
            raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2,..., {_GRID_EXAMPLE}")
        if key == "name":
            raise ConfigError("--grid name: a sweep names each run after its settings")
        if key in (seen for seen, _ in grid):
            raise ConfigError(f"--grid {key}: given twice; list all its values in one --grid")
        grid.append((key, values))
    return grid


def _split_values(text: str) -> list[str]:
    """Split ``text`` at the commas outside quotes and brackets; strip each piece."""
    pieces, current, depth, quote = [], "", 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append(current.strip())
            current = ""
            continue
        current += char
    return [*pieces, current.strip()]


def point_name(base: str, settings: Sequence[str]) -> str:
    """Return a run name for ``base`` with ``settings``: ``demo-data.alpha_0.1-client.lr_0.05``.

    A run's name is also its folder's (letters, digits, '.', '_', '-'): each
    ``key=value`` becomes ``key_value``, with any other character of the value as '_'.
    """
    parts = []
    for setting in settings:
        key, _, value = setting.partition("=")
        parts.append(f"{key}_{_UNSAFE.sub('_', value.strip(_QUOTES))}")
    return "-".join([base, *parts])


def plan_sweep(
    config_path: str | Path,
    grid_specs: Sequence[str],
    sets: Sequence[str] = (),
    *,
    engine_cluster: bool = False,
    overwrite: bool = False,
) -> Sweep:
    """Return the sweep with every point's config validated; raise ``ConfigError`` if one fails.

    ``sets`` apply to every point, the grid's values after them. ``engine_cluster``
    runs each point on the Ray engine, joining the Ray cluster of ``engine.address``
    (``"auto"``, the cluster ``ray start`` began on this machine, unless the config
    names one). A point whose folder already holds a run is refused unless
    ``overwrite``, as is a grid whose points' names would coincide.
    """
    from fedsim.results import holds_run

    grid = parse_grid(grid_specs)
    base = load_config(config_path, list(sets))
    fixed = [*sets]
    if engine_cluster:
        fixed += ["engine.name=ray", f"engine.address={base.engine.address or 'auto'}"]
    points = []
    for values in itertools.product(*(values for _, values in grid)):
        settings = tuple(f"{key}={value}" for (key, _), value in zip(grid, values, strict=True))
        name = point_name(base.name, settings)
        # Quoted: a name such as '2024-01-01-seed_1' must not read as a TOML date.
        config = load_config(config_path, [*fixed, *settings, f"name={json.dumps(name)}"])
        if not overwrite and holds_run(config.run_dir):
            raise ConfigError(
                f"{config.run_dir}/ already holds a run; pass --overwrite to replace the "
                "sweep's runs, or --set name=... for new ones"
            )
        points.append(SweepPoint(settings, config))
    names = [point.config.name for point in points]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise ConfigError(f"--grid: two points would both be named {twice!r}; change a value")
    return Sweep(base, tuple(points), overwrite)


def run_sweep(sweep: Sweep, *, report: Callable[[str], None] = print) -> SweepResult:
    """Run each point in turn, then compare those that completed (:mod:`fedsim.compare`).

    A failing run is reported in one line (``report``) and the sweep goes on; an
    interrupt (``KeyboardInterrupt``) stops it. The comparison's plot goes into
    :attr:`Sweep.folder`; a grid over datasets compares them too, as asked.
    """
    from fedsim.compare import compare_runs
    from fedsim.runner import run_experiment

    done: list[SweepPoint] = []
    failed: list[SweepPoint] = []
    for number, point in enumerate(sweep.points, start=1):
        where = f"sweep {number}/{len(sweep.points)}: {point.config.name}"
        report(f"{where} ({', '.join(point.settings)})")
        try:
            run_experiment(point.config, overwrite=sweep.overwrite)
        except Exception as exc:  # noqa: BLE001 - one failing point must not end the sweep
            report(f"{where} failed: {type(exc).__name__}: {exc}".replace("\n", "\\n"))
            failed.append(point)
        else:
            done.append(point)
    if not done:
        return SweepResult(done, failed, None, None)
    plot = sweep.folder / COMPARISON_FILE
    folders = [point.config.run_dir for point in done]
    table = compare_runs(folders, plot, allow_different_datasets=True)
    return SweepResult(done, failed, table, plot)
