"""``fedsim run CONFIG.toml [--set key=value ...]``: the command-line edge.

Bad input ends in one line naming the problem (exit 2), and so does a run folder
that already holds a run (unless ``--resume`` or ``--overwrite``); a failing run
ends in one line pointing at its partial results (exit 1), with ``--debug`` for
the traceback.
"""

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from fedsim.config import ConfigError, RunConfig, load_config

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsim`` command."""
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        config = load_config(args.config, args.set)
        from fedsim.results import check_run_folder

        check_run_folder(config, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as exc:
        console.print(f"[red]fedsim: config error:[/red] {exc}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    from fedsim.runner import run_experiment  # heavy imports only once the config is valid

    _configure_logging(console, verbose=args.verbose)

    try:
        summary = run_experiment(config, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        console.print(f"fedsim: interrupted{_results_so_far(config)}")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the edge turns any failure into one line
        if args.debug:
            raise
        where = _results_so_far(config)
        console.print(
            f"[red]fedsim: run failed:[/red] {type(exc).__name__}: {exc}{where} "
            "(rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_FAILED
    _print_summary(console, config, summary)
    return 0


def _results_so_far(config: RunConfig) -> str:
    """Point at the run folder when its summary says that the run there stopped early.

    A run that stopped before its first round ended wrote nothing: the folder then
    holds no summary, or the previous run's (pointed at only if it stopped early too).
    """
    from fedsim.results import SUMMARY_FILE

    try:
        status = json.loads((config.run_dir / SUMMARY_FILE).read_text())["status"]
    except (OSError, ValueError, KeyError):
        return ""
    return "" if status == "completed" else f"; results so far are in {config.run_dir}/"


def _configure_logging(console: Console, *, verbose: bool) -> None:
    """Show fedsim's warnings (skipped replies) and, with --verbose, Flower's INFO logs.

    Flower logs each round at INFO and deprecation notices at WARNING; fedsim's
    progress bar and result files replace both. Called after importing flwr,
    whose import resets its logger's level.
    """
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    fedsim_logger = logging.getLogger("fedsim")
    fedsim_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if not fedsim_logger.handlers:
        fedsim_logger.addHandler(RichHandler(console=console, show_path=False))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a federation described by a TOML config")
    run.add_argument("config", help="path to a TOML config, e.g. experiments/configs/demo.toml")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set rounds=5 --set data.alpha=0.1 (repeatable)",
    )  # fmt: skip
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run from its last checkpoint (rounds may be raised to extend it)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in the run folder, once the new run has started",
    )
    run.add_argument("--verbose", action="store_true", help="show Flower's INFO logs")
    run.add_argument("--debug", action="store_true", help="show the traceback when a run fails")
    return parser


def _print_summary(console: Console, config: RunConfig, summary: dict) -> None:
    """Print the summary's headline numbers; those a run does not have are left out."""
    table = Table(title=f"fedsim run '{config.name}'", show_header=False)
    for key in (
        "status",
        "engine",
        "rounds",
        "accuracy",
        "best_accuracy",
        "loss",
        "epsilon",
        "epsilon_paper",
        "dp_epsilon",
        "ldp_epsilon",
        "failures",
        "wall_time_s",
    ):
        value = summary.get(key)
        if value is None:
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("results", f"{config.run_dir}/")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
