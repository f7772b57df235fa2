"""``fedsim run CONFIG.toml [--set key=value ...]``: the command-line edge.

Bad input ends in one line naming the problem (exit 2), and so does a run folder
that already holds a run (unless ``--resume`` or ``--overwrite``); a failing run
ends in one line pointing at its partial results (exit 1), with ``--debug`` for
the traceback. ``fedsim run --example NAME`` runs a config shipped in
``fedsim/configs/`` (``fedsim demo``: the demo), ``--dry-run`` prints the
resolved config and the planned cohorts and traffic (:mod:`fedsim.plan`) and
runs nothing, and ``--quiet`` prints only errors.

This module holds the entry point, the top-level parser and ``run``/``demo``; the
other subcommands add themselves to the parser from their own modules:
``compare`` and ``sweep`` from :mod:`fedsim.compare_cli`; ``certs``, ``keys``,
``deploy`` and ``split`` from :mod:`fedsim.deploy.cli`. What they share (exit
codes, one-line errors, ``--set``) is in :mod:`fedsim.cli_common`.

exit codes:
  0    done (a dry run: the config is valid)
  1    the run failed (a sweep: at least one of its runs failed)
  2    bad input: a config, a flag, a run folder; one line names it
  130  interrupted (Ctrl-C)
"""

import argparse
import importlib.resources
import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from fedsim import __version__
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
from fedsim.compare_cli import add_comparison_commands
from fedsim.config import ConfigError, RunConfig, load_config
from fedsim.deploy.cli import add_deployment_commands

# The module docstring's last paragraph, shown at the end of --help.
EXIT_CODES = __doc__[__doc__.index("exit codes:") :]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsim`` command."""
    args = _parser().parse_args(argv)
    return args.handler(args, Console(stderr=True))


def _run(args: argparse.Namespace, console: Console) -> int:
    """``fedsim run`` (and ``fedsim demo``): run the federation that a TOML config describes."""
    try:
        config = _run_config(args)
        from fedsim.results import check_run_folder

        check_run_folder(config, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as exc:
        config_error(console, exc)
        return EXIT_BAD_INPUT
    from fedsim.runner import run_experiment  # heavy imports only once the config is valid

    configure_logging(console, verbose=args.verbose, quiet=args.quiet)

    try:
        if args.dry_run:
            _print_plan(config)
            return 0
        summary = run_experiment(config, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        console.print(f"fedsim: interrupted{_results_so_far(config)}")
        return EXIT_INTERRUPTED
    except ConfigError as exc:  # bad input found by run_experiment's checks, before any work
        config_error(console, exc)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the edge turns any failure into one line
        if args.debug:
            raise
        where = _results_so_far(config)
        one_line_error(
            console,
            "fedsim: run failed:",
            f"{type(exc).__name__}: {exc}{where}",
            hint="(rerun with --debug for the traceback)",
        )
        return EXIT_FAILED
    if not args.quiet:
        _print_summary(console, config, summary)
    return 0


def _run_config(args: argparse.Namespace) -> RunConfig:
    """Load ``fedsim run``'s config: its path, or the shipped example it names."""
    sets = [*args.set, "progress=false"] if args.quiet else args.set
    if args.example is None:
        return load_config(args.config, sets)
    configs = importlib.resources.files("fedsim") / "configs"
    examples = sorted(
        p.name.removesuffix(".toml") for p in configs.iterdir() if p.name.endswith(".toml")
    )
    if args.example not in examples:
        shipped = ", ".join(examples)
        raise ConfigError(f"--example {args.example!r}: no such example; the examples: {shipped}")
    with importlib.resources.as_file(configs / f"{args.example}.toml") as path:
        return load_config(path, sets)


def _print_plan(config: RunConfig) -> None:
    """``fedsim run --dry-run``: print the resolved config and its plan, as a TOML document."""
    from fedsim.plan import plan_run, toml_lines

    lines = [
        f"# fedsim run --dry-run: the resolved config of {config.name!r}",
        *toml_lines(config),
        *(f"# {line}" for line in plan_run(config).lines()),
        f"# nothing was run; results would go to {config.run_dir}/",
    ]
    print("\n".join(lines))


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsim",
        description=__doc__.splitlines()[0],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the epilog's lines as written
    )
    parser.add_argument("--version", action="version", version=f"fedsim {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(commands)
    add_comparison_commands(commands)
    add_deployment_commands(commands)
    return parser


def _add_run_commands(commands: Subcommands) -> None:
    """Add ``fedsim run`` and its shortcut ``fedsim demo``, which share their options."""
    options = argparse.ArgumentParser(add_help=False)
    add_set_option(options, "e.g. --set rounds=5 --set data.alpha=0.1")
    options.add_argument(
        "--resume",
        action="store_true",
        help="continue the run from its last checkpoint (rounds may be raised to extend it)",
    )
    options.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in the run folder, once the new run has started",
    )
    options.add_argument(
        "--dry-run", action="store_true",
        help="print the resolved config and the planned cohorts and traffic; run nothing",
    )  # fmt: skip
    talk = options.add_mutually_exclusive_group()
    talk.add_argument("--verbose", action="store_true", help="show Flower's INFO logs")
    talk.add_argument(
        "--quiet", action="store_true", help="print errors only: no progress bar, no summary"
    )
    options.add_argument("--debug", action="store_true", help="show the traceback when a run fails")
    run, demo = (
        commands.add_parser(
            name,
            parents=[options],
            help=text,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for name, text in (
            ("run", "run a federation described by a TOML config"),
            ("demo", "run the shipped demo: fedsim run --example demo"),
        )
    )
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "config", nargs="?", help="path to a TOML config, e.g. experiments/configs/demo.toml"
    )
    source.add_argument(
        "--example", metavar="NAME", help="a config shipped with fedsim (fedsim/configs/NAME.toml)"
    )
    run.set_defaults(handler=_run)
    demo.set_defaults(handler=_run, config=None, example="demo")


def _print_summary(console: Console, config: RunConfig, summary: dict) -> None:
    """Print the summary's headline numbers; those a run does not have are left out."""
    table = Table(title=f"fedsim run '{config.name}'", show_header=False)
    for key in (
        "status",
        "engine",
        "rounds",
        "accuracy",
        "best_accuracy",
        "perplexity",
        "mse",
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
        if key == "failures" and (kinds := summary.get("failures_by_kind")):
            table.add_row("  by kind", ", ".join(f"{kind} {n}" for kind, n in kinds.items()))
    table.add_row("results", f"{config.run_dir}/")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
