"""Result files that a killed process never leaves half-written.

Each file is written under a hidden name beside it (``.summary.partial.json`` for
``summary.json``) and then moved over it with ``os.replace``, which is atomic within
one folder on POSIX: whoever reads the folder (a reader, ``--resume``) sees the old
file or the new one, never a mix. A process killed mid-write leaves only the hidden
partial file, which is no result; the next run into the folder removes it
(:func:`remove_partials`).

This is about processes that die (SIGKILL, the OOM killer, a lost node), not
machines that lose power: nothing is fsynced, which would cost a disk flush per
round for the checkpoint alone.
"""

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_path(path: Path) -> Path:
    """Return the hidden file that :func:`replacing` writes before it becomes ``path``.

    The suffix stays last, so writers that pick a format by it (matplotlib) still do.
    """
    return path.with_name(f".{path.stem}.partial{path.suffix}")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a path to write; when the block ends without error, it replaces ``path``.

    An error in the block leaves ``path`` as it was and removes the partial file.
    """
    partial = partial_path(path)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` atomically."""
    with replacing(path) as partial:
        partial.write_text(text)


def remove_partials(folder: Path, names: Iterable[str]) -> None:
    """Remove the partial files of ``names`` in ``folder`` that a killed writer left."""
    for name in names:
        partial_path(folder / name).unlink(missing_ok=True)
