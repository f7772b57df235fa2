"""fedsim: federated-learning simulation on Flower's Message API."""

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedsim.compare import Run

__version__ = "0.1.0"


def load_run(path: str | Path) -> "Run":
    """Return the config, summary and per-round metrics of the run folder ``path``.

    ``metrics`` is a ``pandas.DataFrame`` when pandas is installed, else a list of
    row dicts; see :func:`fedsim.compare.load_run`. Imported on first call, so
    that ``import fedsim`` loads neither torch nor Flower.
    """
    from fedsim.compare import load_run as load

    return load(path)
