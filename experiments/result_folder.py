"""Where an experiment script writes, without ever replacing a result by accident.

A sweep's result is its ``results.json``; the tables and figures are made from it.
By default a full sweep writes to ``runs/<name>/`` and a ``--quick`` smoke test to
``runs/<name>-quick/``, so a smoke test never touches the full result. Any folder
that holds a ``results.json`` is replaced only with ``--overwrite``, except the
default quick folder, whose scratch result a smoke test replaces at will.
"""

import argparse
from pathlib import Path

RESULTS_FILE = "results.json"


def add_folder_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Add ``--out`` and ``--overwrite`` (the script adds ``--quick``)."""
    parser.add_argument(
        "--out", type=Path, help=f"default runs/{name}/, or runs/{name}-quick/ with --quick"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the result OUT already holds"
    )


def folder_of(args: argparse.Namespace, name: str) -> Path:
    """Return ``--out``, or the default folder of a full or ``--quick`` sweep."""
    return args.out or Path("runs") / (f"{name}-quick" if args.quick else name)


def refuse_to_replace(parser: argparse.ArgumentParser, args: argparse.Namespace, out: Path) -> None:
    """Exit (2) with one line if ``out`` holds a result this sweep must not replace."""
    scratch = args.out is None and args.quick
    if (out / RESULTS_FILE).exists() and not (args.overwrite or scratch):
        parser.exit(
            2,
            f"{parser.prog}: {out}/ already holds a result; pass --overwrite to replace it "
            "or --out to write elsewhere\n",
        )
