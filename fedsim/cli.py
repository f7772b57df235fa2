"""``fedsim run CONFIG.toml [--set key=value ...]``: the command-line edge.

Bad input ends in one line naming the problem (exit 2), and so does a run folder
that already holds a run (unless ``--resume`` or ``--overwrite``); a failing run
ends in one line pointing at its partial results (exit 1), with ``--debug`` for
the traceback. ``fedsim run --example NAME`` runs a config shipped in
``fedsim/configs/`` (``fedsim demo``: the demo), ``--dry-run`` prints the
resolved config and the planned cohorts and traffic and runs nothing, and
``--quiet`` prints only errors.

``fedsim compare RUN_DIR ...`` tabulates and plots finished runs side by side
(``fedsim.compare``); ``fedsim sweep CONFIG --grid key=v1,v2 ...`` runs a grid of
``--set`` values one run after another and compares them (``fedsim.sweep``).

``fedsim certs`` and ``fedsim keys`` write the credentials of a Flower deployment
(``fedsim.deploy.credentials``) and print the flags that use them; a file already
there is refused unless ``--overwrite``. ``fedsim deploy CONFIG --nodes N`` runs
a config on a real Flower federation on this machine (``fedsim.deploy.localhost``):
exit 0 when the run completes, 1 otherwise, naming the folder of its logs.
``fedsim split CONFIG --out DIR`` writes each client's partition to its own file,
the data of one SuperNode (``fedsim.data.node_files``).

exit codes:
  0    done (a dry run: the config is valid)
  1    the run failed (a sweep: at least one of its runs failed)
  2    bad input: a config, a flag, a run folder; one line names it
  130  interrupted (Ctrl-C)
"""

import argparse
import importlib.resources
import json
import logging
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence, Set
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from fedsim import __version__
from fedsim.config import ConfigError, RunConfig, load_config

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
# The module docstring's last paragraph, shown at the end of --help.
EXIT_CODES = __doc__[__doc__.index("exit codes:") :]
# flower-superlink's --port default in Flower 1.41 (flwr.supercore.constant.
# SUPERLINK_UVICORN_DEFAULT_PORT): SuperNodes and the flwr CLI both dial it.
SUPERLINK_PORT = 8000
Written = TypeVar("Written")


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
        _config_error(console, exc)
        return EXIT_BAD_INPUT
    from fedsim.runner import run_experiment  # heavy imports only once the config is valid

    _configure_logging(console, verbose=args.verbose, quiet=args.quiet)

    try:
        if args.dry_run:
            _print_plan(config)
            return 0
        summary = run_experiment(config, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        console.print(f"fedsim: interrupted{_results_so_far(config)}")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the edge turns any failure into one line
        if args.debug:
            raise
        where = _results_so_far(config)
        _one_line_error(
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
    from fedsim.sweep import plan_run, toml_lines

    lines = [
        f"# fedsim run --dry-run: the resolved config of {config.name!r}",
        *toml_lines(config),
        *(f"# {line}" for line in plan_run(config).lines()),
        f"# nothing was run; results would go to {config.run_dir}/",
    ]
    print("\n".join(lines))


def _config_error(console: Console, exc: ConfigError) -> None:
    """Print a config error in one line (:func:`_one_line_error`)."""
    _one_line_error(console, "fedsim: config error:", str(exc))


def _one_line_error(console: Console, prefix: str, text: str, *, hint: str = "") -> None:
    """Print ``prefix`` (rich markup: red) and ``text`` in one line, ``text`` as written.

    ``text`` is data, not rich markup: a value such as ``[/x]`` would otherwise be
    read as a markup tag (and raise), and a key with a line break would break the line.
    """
    line = escape(_one_line(text)) + (f" {hint}" if hint else "")
    console.print(f"[red]{prefix}[/red] {line}", highlight=False, soft_wrap=True)


def _one_line(text: str) -> str:
    r"""Return ``text`` with its line breaks written as ``\n``, as ``repr`` writes them."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


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


def _configure_logging(console: Console, *, verbose: bool, quiet: bool = False) -> None:
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
    _add_comparison_commands(commands)

    certs = commands.add_parser(
        "certs", help="write a CA and a TLS certificate for a Flower SuperLink"
    )
    certs.add_argument(
        "--hosts", required=True, metavar="HOST[,HOST...]",
        help="DNS names and IP addresses of the SuperLink (127.0.0.1, ::1, localhost are added)",
    )  # fmt: skip
    certs.add_argument("--out", required=True, metavar="DIR", help="folder for the files")
    certs.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    certs.add_argument("--overwrite", action="store_true", help="replace files in DIR")
    certs.set_defaults(handler=_certs)

    keys = commands.add_parser("keys", help="write SuperNode key pairs for node authentication")
    keys.add_argument("--out", required=True, metavar="DIR", help="folder for the files")
    keys.add_argument("--nodes", required=True, type=int, metavar="N", help="number of SuperNodes")
    keys.add_argument("--overwrite", action="store_true", help="replace files in DIR")
    keys.set_defaults(handler=_keys)

    deploy = commands.add_parser(
        "deploy", help="run a config on a real Flower federation on this machine (TLS, auth)"
    )
    deploy.add_argument("config", help="path to a TOML config, e.g. experiments/configs/demo.toml")
    deploy.add_argument(
        "--nodes", required=True, type=int, metavar="N",
        help="number of SuperNodes; sets data.num_clients = N (one partition each)",
    )  # fmt: skip
    _add_set_option(deploy)
    deploy.add_argument(
        "--overwrite", action="store_true", help="replace the run already in the run folder"
    )
    deploy.add_argument(
        "--node-data", metavar="DIR",
        help="each SuperNode's own data: DIR/node-<i>.pt or .npz (see fedsim split)",
    )  # fmt: skip
    deploy.add_argument(
        "--insecure", action="store_true",
        help="no TLS, no SuperNode authentication (a trusted network only; prints a warning)",
    )  # fmt: skip
    deploy.add_argument(
        "--timeout", type=float, default=3600, metavar="S", help="seconds to wait for the run"
    )
    deploy.set_defaults(handler=_deploy)

    split = commands.add_parser(
        "split", help="write each client's partition of a config's data to its own file"
    )
    split.add_argument("config", help="path to a TOML config, e.g. experiments/configs/demo.toml")
    split.add_argument("--out", required=True, metavar="DIR", help="folder for node-<i>.pt")
    _add_set_option(split)
    split.set_defaults(handler=_split)
    return parser


def _add_set_option(parser: argparse.ArgumentParser, example: str = "") -> None:
    """Add ``--set KEY=VALUE`` (repeatable), as ``fedsim run`` reads it."""
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a config value, {example or 'as in fedsim run'} (repeatable)",
    )  # fmt: skip


def _add_run_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``fedsim run`` and its shortcut ``fedsim demo``, which share their options."""
    options = argparse.ArgumentParser(add_help=False)
    _add_set_option(options, "e.g. --set rounds=5 --set data.alpha=0.1")
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


def _add_comparison_commands(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
) -> None:
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
    _add_set_option(sweep, "for every run of the sweep")
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
        _one_line_error(console, "fedsim compare:", f"--out {args.out}: expected a .png file")
        return EXIT_BAD_INPUT
    try:
        table = compare_runs(args.runs, out, allow_different_datasets=args.allow_different_datasets)
    except (RunFolderError, IncomparableRunsError) as exc:
        _one_line_error(console, "fedsim compare:", str(exc))
        return EXIT_BAD_INPUT
    except OSError as exc:  # the plot could not be written: still the user's --out
        _one_line_error(console, "fedsim compare:", f"--out {args.out}: {exc}")
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
        _config_error(console, exc)
        return EXIT_BAD_INPUT
    _configure_logging(console, verbose=args.verbose)
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
        _one_line_error(console, "fedsim sweep:", f"{len(result.failed)} run(s) failed: {names}")
        return EXIT_FAILED
    return 0


def _certs(args: argparse.Namespace, console: Console) -> int:
    """``fedsim certs``: write the SuperLink's certificates and print how to pass them."""
    from fedsim.deploy.credentials import LOOPBACK_HOSTS, write_certificates

    hosts = args.hosts.split(",")
    out = Path(args.out).expanduser().resolve()
    certs = _written(
        console,
        args.command,
        lambda: write_certificates(out, hosts, days=args.days, overwrite=args.overwrite),
    )
    if certs is None:
        return EXIT_BAD_INPUT
    added = [h for h in LOOPBACK_HOSTS if h not in {given.strip() for given in hosts}]
    first = hosts[0].strip()
    host = f"[{first}]" if ":" in first else first  # an IPv6 address takes brackets before a port
    address = f"{host}:{SUPERLINK_PORT}"
    supernode_args = ["--superlink", address, "--root-certificates", str(certs.ca_cert)]
    # --host: the SuperLink listens on 127.0.0.1 unless told otherwise.
    superlink_args = [*certs.superlink_args(), "--host", "0.0.0.0", "--port", str(SUPERLINK_PORT)]
    lines = [
        f"Wrote a CA and a SuperLink certificate for {', '.join(h.strip() for h in hosts)}"
        + (f" (and {', '.join(added)})" if added else "")
        + f", valid {args.days} days, to {out}/:",
        f"  {certs.ca_cert.name:<10}  CA certificate: copy it to each SuperNode and flwr CLI user",
        f"  {certs.ca_key.name:<10}  CA key (0600): keep it off the machines; it signs new ones",
        f"  {certs.server_cert.name:<10}  SuperLink certificate",
        f"  {certs.server_key.name:<10}  SuperLink key (0600): for the SuperLink's machine only",
        "Start the SuperLink with (Flower 1.41 serves the Fleet, Control and Runtime APIs on "
        f"one HTTPS port, {SUPERLINK_PORT} by default: open it in the firewall)",
        f"  flower-superlink {shlex.join(superlink_args)}",
        f"each SuperNode with (the same address and port, {address})",
        f"  flower-supernode {shlex.join(supernode_args)}",
        "and give the flwr CLI the same address and the CA's absolute path in "
        "$FLWR_HOME/config.toml (~/.flwr/config.toml):",
        "  [superlink]",
        '  default = "fedsim"',
        "  [superlink.fedsim]",
        f"  address = {json.dumps(address)}",
        f"  root-certificates = {json.dumps(str(certs.ca_cert))}",
    ]
    print("\n".join(lines))
    return 0


def _keys(args: argparse.Namespace, console: Console) -> int:
    """``fedsim keys``: write SuperNode key pairs and print how to register them."""
    from fedsim.deploy.credentials import write_supernode_keys

    out = Path(args.out).expanduser().resolve()
    pairs = _written(
        console,
        args.command,
        lambda: write_supernode_keys(out, args.nodes, overwrite=args.overwrite),
    )
    if pairs is None:
        return EXIT_BAD_INPUT
    lines = [
        f"Wrote {len(pairs)} SuperNode key pair{'s' if len(pairs) != 1 else ''} "
        f"(ECDSA P-384, OpenSSH format) to {out}/: "
        "supernode-<i> (private, 0600) and supernode-<i>.pub (public).",
        "Start the SuperLink with TLS (fedsim certs) and --enable-supernode-auth, register each",
        "public key with the flwr CLI (it uses the default SuperLink connection of",
        "$FLWR_HOME/config.toml; append a connection name to pick another):",
        *(f"  flwr supernode register {shlex.quote(str(pair.public_key))}" for pair in pairs),
        "and start each SuperNode with its private key:",
        *(
            f"  flower-supernode --auth-supernode-private-key {shlex.quote(str(pair.private_key))}"
            for pair in pairs
        ),
    ]
    print("\n".join(lines))
    return 0


def _deploy(args: argparse.Namespace, console: Console) -> int:
    """``fedsim deploy``: run a config on a TLS SuperLink and ``--nodes`` SuperNodes here."""
    if args.nodes < 1:
        console.print(f"fedsim deploy: --nodes: expected at least 1, got {args.nodes}")
        return EXIT_BAD_INPUT
    node_files = _node_files(args.node_data, args.nodes) if args.node_data else []
    if node_files is None:
        console.print(
            f"fedsim deploy: --node-data: {args.node_data} lacks a node-<i>.pt or "
            f".npz for every i < {args.nodes} (fedsim split writes them)",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_BAD_INPUT
    sets = [*args.set, f"data.num_clients={args.nodes}"]
    try:
        config = load_config(args.config, sets)
        if node_files and not config.data.load_partition:
            hook = "fedsim.data.node_files:load_partition"
            config = load_config(args.config, [*sets, f"data.load_partition={hook}"])
        from fedsim.results import check_run_folder

        check_run_folder(config, resume=False, overwrite=args.overwrite)
        from fedsim.deploy.localhost import app_config_keys

        app_dir = Path(__file__).resolve().parents[1]  # the repository: its pyproject is the app
        declared = app_config_keys(app_dir)
        run_config = {**deployed_run_config(config, declared), "overwrite": args.overwrite}
    except ConfigError as exc:
        _config_error(console, exc)
        return EXIT_BAD_INPUT
    from fedsim.deploy.localhost import DeploymentError, LocalFederation

    run_dir = config.run_dir.resolve()
    if args.insecure:
        print(
            "fedsim deploy: WARNING --insecure: no TLS and no SuperNode authentication; "
            "models and updates travel in clear text and any process that reaches the "
            "port can join as a SuperNode",
            file=sys.stderr,
            flush=True,
        )
    # keep: a failure's logs outlive the federation; a success removes them below.
    federation = LocalFederation(
        nodes=args.nodes, keep=True, node_files=node_files, insecure=args.insecure
    )
    try:
        with federation:
            link, nodes = ("a TLS SuperLink", "authenticated")
            if args.insecure:
                link, nodes = ("an insecure SuperLink (no TLS)", "unauthenticated")
            print(
                f"federation up: {link} on 127.0.0.1:{federation.port} and "
                f"{args.nodes} {nodes} SuperNodes ({federation.started_s:.1f} s); "
                f"logs in {federation.logs}/ (kept if the run fails)",
                flush=True,
            )
            print(f"running {config.name!r} ({config.rounds} rounds) with flwr run ...", flush=True)
            status = federation.run(app_dir, run_config, timeout_s=args.timeout)
            print(f"run {federation.last_run_id}: {status}", flush=True)
            if status != "finished:completed":
                print(
                    f"fedsim deploy: the run did not complete; logs in {federation.logs}/ "
                    f"(run-{federation.last_run_id}.log: the run's own log)"
                )
                return EXIT_FAILED
    except DeploymentError as exc:
        console.print(
            f"[red]fedsim deploy:[/red] {escape(str(exc))}; logs in {federation.logs}/",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        console.print(f"fedsim deploy: interrupted; logs in {federation.logs}/")
        return EXIT_INTERRUPTED
    shutil.rmtree(federation.logs.parent, ignore_errors=True)
    print(f"results in {run_dir}/")
    return 0


def _node_files(folder: str, nodes: int) -> list[Path] | None:
    """Return ``folder/node-<i>.pt`` (or ``.npz``) for each node, or None if one is missing."""
    found = []
    for i in range(nodes):
        candidates = [Path(folder) / f"node-{i}{suffix}" for suffix in (".pt", ".npz")]
        existing = [path for path in candidates if path.is_file()]
        if not existing:
            return None
        found.append(existing[0].resolve())
    return found


def _split(args: argparse.Namespace, console: Console) -> int:
    """``fedsim split``: write each client's partition of the config's data to a file."""
    try:
        config = load_config(args.config, args.set)
    except ConfigError as exc:
        _config_error(console, exc)
        return EXIT_BAD_INPUT
    from fedsim.data.node_files import write_partition_files
    from fedsim.experiment import federated_data

    data = federated_data(config.data, config.seed)
    partitions = [data.client_dataset(i) for i in range(data.num_partitions)]
    paths = write_partition_files(partitions, Path(args.out).expanduser().resolve())
    sizes = [len(partition) for partition in partitions]
    print(
        f"Wrote {len(paths)} files, node-0.pt .. node-{len(paths) - 1}.pt, to "
        f"{paths[0].parent}/ ({config.data.dataset}, {config.data.partitioner}, seed "
        f"{config.seed}; {min(sizes)} to {max(sizes)} examples each). Copy node-<i>.pt to "
        'SuperNode i and start it with --node-config "partition-id=<i> num-partitions='
        f"{len(paths)} data-file='/path/to/node-<i>.pt'\"; run with data.load_partition = "
        '"fedsim.data.node_files:load_partition".'
    )
    return 0


def deployed_run_config(
    config: RunConfig, declared: Set[str] = frozenset()
) -> dict[str, str | int | float | bool]:
    """Return Flower's flat ``run_config`` for ``config``: what the app would not know.

    That is every key that differs from fedsim's defaults, and every key the app
    declares (``declared``, its ``[tool.flwr.app.config]``): the app's value of a
    declared key may differ from fedsim's default, so a config that sets the
    default must say so. ``output_dir`` is made absolute, because the ServerApp runs
    in the SuperLink's folder, not here; ``name`` and ``output_dir`` are always given.
    """
    from fedsim.config import flatten

    defaults = flatten(RunConfig())
    flat = flatten(config)
    flat["output_dir"] = str(config.run_dir.resolve().parent)
    given = {"name", "output_dir", *declared}
    changed = {k: v for k, v in flat.items() if v != defaults.get(k) or k in given}
    kept = {k: v for k, v in changed.items() if isinstance(v, str | int | float | bool)}
    if dropped := sorted(set(changed) - set(kept)):
        raise ConfigError(f"{', '.join(dropped)}: a Flower run config holds only scalars")
    return kept


def _written(console: Console, command: str, write: Callable[[], Written]) -> Written | None:
    """Return what ``write`` wrote, or print why it could not in one line and return None."""
    from fedsim.deploy.credentials import CredentialsError

    try:
        return write()
    except CredentialsError as exc:
        option, reason = exc.option, exc.reason
    except OSError as exc:  # an unwritable or vanished folder: still the user's --out
        option, reason = "out", str(exc)
    console.print(
        f"[red]fedsim {command}:[/red] --{option}: {escape(reason)}",
        highlight=False,
        soft_wrap=True,
    )
    return None


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
