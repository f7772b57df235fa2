"""What every ``fedsim`` subcommand shares: exit codes, one-line errors, ``--set``, logging.

The subcommands live in their own modules (:mod:`fedsim.cli`, :mod:`fedsim.compare_cli`,
:mod:`fedsim.deploy.cli`); they share these helpers from here rather than from
:mod:`fedsim.cli`, which imports them all to build its parser: ``python -m
fedsim.cli`` would otherwise load that module a second time, as ``fedsim.cli``.
Only light imports here, so that ``fedsim --help`` stays fast.
"""

import argparse
import logging
from typing import TypeAlias

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from fedsim.config import ConfigError

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
# What ``add_subparsers`` returns: each subcommand module adds its commands to it.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_set_option(parser: argparse.ArgumentParser, example: str = "") -> None:
    """Add ``--set KEY=VALUE`` (repeatable), as ``fedsim run`` reads it."""
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a config value, {example or 'as in fedsim run'} (repeatable)",
    )  # fmt: skip


def config_error(console: Console, exc: ConfigError) -> None:
    """Print a config error in one line (:func:`one_line_error`)."""
    one_line_error(console, "fedsim: config error:", str(exc))


def one_line_error(console: Console, prefix: str, text: str, *, hint: str = "") -> None:
    """Print ``prefix`` (rich markup: red) and ``text`` in one line, ``text`` as written.

    ``text`` is data, not rich markup: a value such as ``[/x]`` would otherwise be
    read as a markup tag (and raise), and a key with a line break would break the line.
    """
    line = escape(_one_line(text)) + (f" {hint}" if hint else "")
    console.print(f"[red]{prefix}[/red] {line}", highlight=False, soft_wrap=True)


def _one_line(text: str) -> str:
    r"""Return ``text`` with its line breaks written as ``\n``, as ``repr`` writes them."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def configure_logging(console: Console, *, verbose: bool, quiet: bool = False) -> None:
    """Show fedsim's warnings (skipped replies), with --verbose Flower's INFO logs too.

    Flower logs each round at INFO and deprecation notices at WARNING; fedsim's
    progress bar and result files replace both. --quiet leaves errors only. Called
    after importing flwr, whose import resets its logger's level.
    """
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    fedsim_logger = logging.getLogger("fedsim")
    level = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    fedsim_logger.setLevel(level)
    if not fedsim_logger.handlers:
        fedsim_logger.addHandler(RichHandler(console=console, show_path=False))
