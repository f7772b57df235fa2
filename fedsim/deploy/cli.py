"""``fedsim certs``, ``keys``, ``deploy`` and ``split``: fedsim on a real Flower federation.

``fedsim certs`` and ``fedsim keys`` write the credentials of a Flower deployment
(:mod:`fedsim.deploy.credentials`) and print the flags that use them; a file already
there is refused unless ``--overwrite``. ``fedsim deploy CONFIG --nodes N`` runs
a config on a real Flower federation on this machine (:mod:`fedsim.deploy.localhost`):
exit 0 when the run completes, 1 otherwise, naming the folder of its logs.
``fedsim split CONFIG --out DIR`` writes each client's partition to its own file,
the data of one SuperNode (:mod:`fedsim.data.node_files`). The handlers import
the modules that do the work when called, so that ``fedsim --help`` stays fast.
"""

import argparse
import json
import shlex
import shutil
import sys
from collections.abc import Callable, Set
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.markup import escape

from fedsim.cli_common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    Subcommands,
    add_set_option,
    config_error,
)
from fedsim.config import ConfigError, RunConfig, load_config

# flower-superlink's --port default in Flower 1.41 (flwr.supercore.constant.
# SUPERLINK_UVICORN_DEFAULT_PORT): SuperNodes and the flwr CLI both dial it.
SUPERLINK_PORT = 8000
Written = TypeVar("Written")


def add_deployment_commands(commands: Subcommands) -> None:
    """Add ``fedsim certs``, ``keys``, ``deploy`` and ``split``."""
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
    add_set_option(deploy)
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
    add_set_option(split)
    split.set_defaults(handler=_split)


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

        app_dir = Path(__file__).resolve().parents[2]  # the repository: its pyproject is the app
        declared = app_config_keys(app_dir)
        run_config = {**deployed_run_config(config, declared), "overwrite": args.overwrite}
    except ConfigError as exc:
        config_error(console, exc)
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
        config_error(console, exc)
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
