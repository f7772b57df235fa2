"""``fedsim compare`` and ``fedsim sweep``: their options and the handlers that print results.

``fedsim compare RUN_DIR ...`` tabulates and plots finished runs side by side
(:mod:`fedsim.compare`); ``fedsim sweep CONFIG --grid key=v1,v2 ...`` runs a grid
of ``--set`` values one run after another and compares them (:mod:`fedsim.sweep`).
The handlers only turn arguments into calls and errors into one line; they import
the modules that do the work when called, so that ``fedsim --help`` stays fast.
"""

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedsim.cli_common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    Subcommands,
    add_set_option,
    config_error,
    configure_logging,
    one_line_error,
)
from fedsim.config import ConfigError


def add_comparison_commands(commands: Subcommands) -> None:
    """Add ``fedsim compare`` and ``fedsim sweep``."""
    compare = commands.add_parser("compare", help="tabulate and plot finished runs side by side")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, e.g. runs/demo")
    compare.add_argument(
        "--out", default="compare.png", metavar="FILE.png",
        help="where the plot goes (default: compare.png)",
    )  # fmt: skip
    compare.add_argument(
        "--allow-different-datasets", action="store_true",
        help="compare runs whose data.dataset differs (refused otherwise)",
    )  # fmt: skip
    compare.set_defaults(handler=_compare)

    sweep = commands.add_parser(
        "sweep", help="run a config over a grid of values, one run after another, and compare"
    )
    sweep.add_argument("config", help="path to a TOML config, e.g. experiments/configs/demo.toml")
    sweep.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2",
        help="a config key's values, e.g. --grid data.alpha=0.1,1.0 (repeatable: all combinations)",
    )  # fmt: skip
    add_set_option(sweep, "for every run of the sweep")
    sweep.add_argument(
        "--engine-cluster", action="store_true",
        help="run each point on the Ray engine in the cluster of engine.address (default: auto)",
    )  # fmt: skip
    sweep.add_argument("--overwrite", action="store_true", help="replace the sweep's runs")
    sweep.add_argument("--verbose", action="store_true", help="show Flower's INFO logs")
    sweep.set_defaults(handler=_sweep)


def _compare(args: argparse.Namespace, console: Console) -> int:
    """``fedsim compare``: one table and one plot of several runs."""
    from fedsim.compare import IncomparableRunsError, RunFolderError, compare_runs

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        one_line_error(console, "fedsim compare:", f"--out {args.out}: expected a .png file")
        return EXIT_BAD_INPUT
    try:
        table = compare_runs(args.runs, out, allow_different_datasets=args.allow_different_datasets)
    except (RunFolderError, IncomparableRunsError) as exc:
        one_line_error(console, "fedsim compare:", str(exc))
        return EXIT_BAD_INPUT
    except OSError as exc:  # the plot could not be written: still the user's --out
        one_line_error(console, "fedsim compare:", f"--out {args.out}: {exc}")
        return EXIT_BAD_INPUT
    _print_table(table)
    print(f"plot in {out}")
    return 0


def _sweep(args: argparse.Namespace, console: Console) -> int:
    """``fedsim sweep``: validate every point of the grid, run them, compare those that ran."""
    from fedsim.sweep import plan_sweep, run_sweep

    try:
        sweep = plan_sweep(
            args.config, args.grid, args.set,
            engine_cluster=args.engine_cluster, overwrite=args.overwrite,
        )  # fmt: skip
    except ConfigError as exc:
        config_error(console, exc)
        return EXIT_BAD_INPUT
    configure_logging(console, verbose=args.verbose)
    try:
        result = run_sweep(
            sweep,
            report=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True),
        )
    except KeyboardInterrupt:
        console.print("fedsim sweep: interrupted")
        return EXIT_INTERRUPTED
    if result.table is not None:
        _print_table(result.table)
        print(f"plot in {result.plot}")
    if result.failed:
        names = ", ".join(point.config.name for point in result.failed)
        one_line_error(console, "fedsim sweep:", f"{len(result.failed)} run(s) failed: {names}")
        return EXIT_FAILED
    return 0


def _print_table(table: Table) -> None:
    """Print ``table`` to stdout, at its full width when stdout is not a terminal.

    Rich fits tables into 80 columns off a terminal, cutting the runs' names short
    in a file or pipe, where nothing needs the cut.
    """
    console = Console()
    if not console.is_terminal:
        unbounded = console.options.update_width(10**4)
        console = Console(
            width=max(console.width, console.measure(table, options=unbounded).maximum)
        )
    console.print(table)
