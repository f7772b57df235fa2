"""A real Flower deployment on one machine: a TLS SuperLink and N authenticated SuperNodes.

Not Flower's simulation runtime: each SuperNode is its own ``flower-supernode``
process that dials the SuperLink's Fleet API over TLS, signs its requests with
its own key, and runs the ClientApp in a subprocess, exactly as on a real
machine. ``LocalFederation`` sets one up in a temporary folder and tears it down::

    with LocalFederation(nodes=3) as federation:
        status = federation.run(Path("."), {"rounds": 3, "data.num_clients": 3})

On entry, it

1. writes a CA, the SuperLink's certificate and one key pair per SuperNode
   (:mod:`fedsim.deploy.credentials`);
2. starts ``flower-superlink`` with TLS, ``--enable-supernode-auth``, an SQLite
   ``--database`` and ``--disable-runtime-dependency-installation`` (the
   ServerApp and ClientApps use the packages installed here, CPU torch included,
   instead of ``uv sync`` resolving them again from the registry), on free ports;
3. writes ``$FLWR_HOME/config.toml`` with one TLS connection to it and registers
   each public key with ``flwr supernode register``;
4. starts one ``flower-supernode`` per key, with ``--node-config
   "partition-id=i num-partitions=N"`` and its own Runtime API port.

Every process writes its log to ``<root>/logs/``; on exit each is stopped by PID
(SIGTERM to its process group, SIGKILL after a grace period), failure or not.

Faults: ``submit`` starts a run without waiting for it, ``kill_supernode(i)`` crashes
SuperNode ``i`` (SIGKILL to it and all it started) and ``restart_supernode(i)``
starts it again with the same key. Flower 1.41 notices a dead SuperNode only by
its missing heartbeats (one every 30 s, fixed in the SuperNode): two intervals
after the last one the SuperLink marks it offline and answers each message still
addressed to it with a ``NODE_UNAVAILABLE`` error reply, which the ServerApp pulls
like any reply. Only then does it accept the same key again.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fedsim.deploy.credentials import KeyPair, write_certificates, write_supernode_keys
from fedsim.keys import DATA_FILE
from fedsim.processes import kill_if_alive, process_tree, signal_group

CONNECTION = "fedsim-localhost"
FINISHED = "finished"
APP_CONFIG_HEADER = "[tool.flwr.app.config]"
ConfigValue = str | int | float | bool


class DeploymentError(RuntimeError):
    """A process of the federation failed to start, or a run did not finish in time."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that the kernel just reported free."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tool(name: str) -> str:
    # The flwr executables installed next to this interpreter (the venv's bin/).
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


@dataclass
class _Process:
    name: str
    command: list[str]
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class LocalFederation:
    """A TLS SuperLink and ``nodes`` authenticated SuperNodes on localhost.

    Parameters
    ----------
    nodes : int
        Number of SuperNodes; node ``i`` (from 0) gets ``partition-id=i``.
    root : Path | None
        Folder for credentials, database, logs and ``FLWR_HOME``; a new temporary
        folder (removed on exit unless ``keep``) if None.
    keep : bool
        Keep a temporary ``root`` on exit, for its logs.
    torch_threads : int
        ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` of every process, hence torch's
        intra-op threads in each ClientApp.
    grace_s : float
        Seconds between SIGTERM and SIGKILL when stopping a process.
    node_files : Sequence[Path]
        Each SuperNode's own data file, ``data-file`` in its ``--node-config``
        (node ``i`` gets ``node_files[i]``), for runs whose config sets
        ``data.load_partition = "fedsim.data.node_files:load_partition"``.
    insecure : bool
        No TLS and no SuperNode authentication: every byte in clear text, any
        process that reaches the port can join. Only for a trusted network.
    database : bool
        Keep the SuperLink's state in SQLite (``--database``), so registrations
        survive a restart. False keeps it in memory: Flower 1.41's SQLite state,
        starved of CPU by 20 SuperNodes and their ClientApps on two cores,
        answered replies with "database is locked" (HTTP 500) and lost them.
    """

    nodes: int
    root: Path | None = None
    keep: bool = False
    torch_threads: int = 1
    grace_s: float = 10.0
    node_files: Sequence[Path] = ()
    insecure: bool = False
    database: bool = True
    started_s: float = field(init=False, default=0.0)
    _processes: list[_Process] = field(init=False, default_factory=list)
    supernodes: list[subprocess.Popen[bytes]] = field(init=False, default_factory=list)
    _temporary: bool = field(init=False, default=False)

    def __enter__(self) -> "LocalFederation":
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="fedsim-deploy-"))
            self._temporary = True
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    # -- paths and environment ------------------------------------------------------------

    @property
    def home(self) -> Path:
        """``FLWR_HOME`` of every process, and of the flwr CLI calls."""
        return self._root / "flwr"

    @property
    def logs(self) -> Path:
        """Folder of every process's log (``superlink.log``, ``supernode-<i>.log``, ...)."""
        return self._root / "logs"

    @property
    def _root(self) -> Path:
        assert self.root is not None, "LocalFederation is used outside its `with` block"
        return Path(self.root)

    def env(self) -> dict[str, str]:
        """Return the environment of every process this federation starts."""
        threads = str(self.torch_threads)
        bin_dir = str(Path(sys.executable).parent)
        return {
            **os.environ,
            # The SuperLink and SuperNodes start flower-superexec and flwr-*app by name.
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
            "FLWR_HOME": str(self.home),
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
        }

    # -- start-up -------------------------------------------------------------------------

    def _start(self) -> None:
        begin = time.monotonic()
        root = self._root
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        if self.node_files and len(self.node_files) != self.nodes:
            raise ValueError(f"{len(self.node_files)} node files for {self.nodes} SuperNodes")
        self.keys = write_supernode_keys(root / "keys", self.nodes)
        # Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTPS port
        # (--host/--port); --fleet-api-address and --control-api-address are ignored.
        self.port = free_port()
        if self.insecure:
            security = ["--insecure"]
        else:
            certs = write_certificates(root / "certs", ["127.0.0.1"], days=1)
            self.ca_cert = certs.ca_cert
            security = [*certs.superlink_args(), "--enable-supernode-auth"]
        self.superlink_command = [
            _tool("flower-superlink"),
            *security,
            *(["--database", str(root / "state.db")] if self.database else []),
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(self.port),
        ]  # fmt: skip
        superlink = self._spawn("superlink", self.superlink_command)
        _wait_for_port(self.port, superlink, timeout_s=60)
        self._write_flwr_config()
        if not self.insecure:
            for pair in self.keys:
                self.register(pair)
        self.supernodes = [
            self.start_supernode(pair, partition_id=i) for i, pair in enumerate(self.keys)
        ]
        self.started_s = time.monotonic() - begin

    def _write_flwr_config(self) -> None:
        (self.home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "127.0.0.1:{self.port}"\n'
            + (
                "insecure = true\n"
                if self.insecure
                else f"root-certificates = {json.dumps(str(self.ca_cert.resolve()))}\n"
            )
        )

    def flwr(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the flwr CLI against this federation's SuperLink (``FLWR_HOME`` set)."""
        return subprocess.run(
            [_tool("flwr"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def register(self, pair: KeyPair) -> None:
        """Register ``pair``'s public key with the SuperLink, so that it admits the SuperNode."""
        done = self.flwr("supernode", "register", str(pair.public_key), CONNECTION)
        with (self.logs / "flwr-cli.log").open("a") as log:
            log.write(f"$ flwr supernode register {pair.public_key} {CONNECTION}\n")
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise DeploymentError(
                f"flwr supernode register {pair.name} exited {done.returncode}: "
                f"{(done.stdout + done.stderr).strip()[-500:]}"
            )

    def supernode_command(self, pair: KeyPair, *, partition_id: int) -> list[str]:
        """Return the ``flower-supernode`` command line of ``pair``'s SuperNode."""
        node_config = f"partition-id={partition_id} num-partitions={self.nodes}"
        if self.node_files:
            path = Path(self.node_files[partition_id]).resolve()
            node_config += f" {DATA_FILE}={_toml_value(str(path))}"
        security = (
            ["--insecure"]
            if self.insecure
            else [
                "--root-certificates", str(self.ca_cert),
                "--auth-supernode-private-key", str(pair.private_key),
            ]
        )  # fmt: skip
        return [
            _tool("flower-supernode"),
            "--superlink", f"127.0.0.1:{self.port}",
            *security,
            "--node-config", node_config,
            "--host", "127.0.0.1",
            "--port", str(free_port()),
        ]  # fmt: skip

    def start_supernode(
        self, pair: KeyPair, *, partition_id: int, name: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a SuperNode with ``pair``'s private key (registered or not).

        Its log is ``logs/<name>.log``, ``name`` defaulting to the key pair's.
        """
        command = self.supernode_command(pair, partition_id=partition_id)
        return self._spawn(name or pair.name, command)

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            out.write(f"$ {' '.join(command)}\n".encode())
            out.flush()
            # A session of its own: stopping its group also stops the app
            # processes (SuperExec, ServerApp, ClientApp) it started.
            popen = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self._root,
                start_new_session=True,
            )
        self._processes.append(_Process(name, command, popen, log))
        return popen

    # -- runs ------------------------------------------------------------------------------

    def run(
        self, app_dir: Path, run_config: Mapping[str, ConfigValue], *, timeout_s: float = 600
    ) -> str:
        """Run the Flower App in ``app_dir`` with ``run_config``; return its final status.

        :meth:`submit`, then :meth:`wait`.

        Returns
        -------
        str
            Flower's status text, such as ``finished:completed`` or ``finished:failed``.

        Raises
        ------
        DeploymentError
            If ``flwr run`` fails or the run does not finish within ``timeout_s``.
        """
        return self.wait(self.submit(app_dir, run_config), timeout_s=timeout_s)

    def submit(self, app_dir: Path, run_config: Mapping[str, ConfigValue]) -> int:
        """Start the Flower App in ``app_dir`` with ``run_config``; return its run id.

        ``flwr run --run-config`` overrides only keys that the app's
        ``[tool.flwr.app.config]`` lists. Keys it lacks are added to a staged copy of
        the app's ``pyproject.toml`` (the FAB then carries no code: with runtime
        dependency installation disabled, the app runs from the installed package).

        Raises
        ------
        DeploymentError
            If ``flwr run`` fails.
        """
        app_dir = Path(app_dir).resolve()
        app = _staged_app(app_dir, run_config, self._root / "apps") or app_dir
        overrides = " ".join(f"{key}={_toml_value(value)}" for key, value in run_config.items())
        args = ["run", str(app), CONNECTION, "--format", "json"]
        if overrides:
            args += ["--run-config", overrides]
        done = self.flwr(*args)
        with (self.logs / "flwr-cli.log").open("a") as log:
            log.write(f"$ flwr {' '.join(args)}\n{done.stdout}{done.stderr}")
        try:
            run_id = json.loads(done.stdout)["run-id"]
        except (ValueError, KeyError, TypeError):
            run_id = None
        if done.returncode != 0 or run_id is None:
            raise DeploymentError(f"flwr run failed: {(done.stdout + done.stderr).strip()[-800:]}")
        self.last_run_id = int(run_id)
        return self.last_run_id

    def status(self, run_id: int) -> str:
        """Return the status text of run ``run_id`` (``flwr ls --run-id``)."""
        done = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(done.stdout)["runs"]
        except (ValueError, KeyError, TypeError) as error:
            raise DeploymentError(
                f"flwr ls: {(done.stdout + done.stderr).strip()[-500:]}"
            ) from error
        return str(runs[0]["status"])

    def wait(self, run_id: int, *, timeout_s: float = 600, poll_s: float = 1.0) -> str:
        """Wait until run ``run_id`` is finished; return its status text."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(run_id)
            if status.startswith(FINISHED):
                with (self.logs / f"run-{run_id}.log").open("w") as log:
                    done = self.flwr("log", str(run_id), CONNECTION, "--show")
                    log.write(done.stdout + done.stderr)
                return status
            if time.monotonic() > deadline:
                raise DeploymentError(f"run {run_id} still {status!r} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    # -- faults ----------------------------------------------------------------------------

    def kill_supernode(self, i: int, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to SuperNode ``i``, its process group and every descendant.

        With SIGKILL this is a machine's crash: no deactivation reaches the
        SuperLink, which counts the node online until two heartbeats lapse
        (Flower 1.41: ``HEARTBEAT_PATIENCE`` 2 x 30 s).
        """
        popen = self.supernodes[i]
        descendants = process_tree(popen.pid) - {popen.pid}
        signal_group(popen.pid, sig)
        for pid in descendants:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if sig == signal.SIGKILL:
            popen.wait()

    def restart_supernode(self, i: int) -> subprocess.Popen[bytes]:
        """Start SuperNode ``i`` again, with its key and partition; its log is appended.

        Flower 1.41's SuperLink activates a node only while it is registered or
        offline: one killed less than two heartbeats (60 s) ago still counts as online.
        """
        self.supernodes[i] = self.start_supernode(self.keys[i], partition_id=i)
        return self.supernodes[i]

    # -- shutdown --------------------------------------------------------------------------

    def _stop(self) -> None:
        """Stop every process started, SuperNodes first: SIGTERM, then SIGKILL after grace.

        Flower starts its SuperExec in a session of its own (they exit when their
        parent does): their PIDs are noted before the SIGTERM and killed if left.
        """
        # Not the roots themselves: once reaped below, their PIDs may be reused.
        spawned = {
            pid for p in self._processes for pid in process_tree(p.popen.pid) - {p.popen.pid}
        }
        for process in reversed(self._processes):
            signal_group(process.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for process in reversed(self._processes):
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Its group may still hold app processes: make sure nothing is left.
            signal_group(process.popen.pid, signal.SIGKILL)
            if process.popen.poll() is None:
                process.popen.wait()
        for pid in spawned:
            kill_if_alive(pid)
        self._processes.clear()
        if self._temporary and not self.keep and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(f"{process.args!r} exited {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def _toml_value(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a JSON string is a TOML basic string


def app_config_keys(app_dir: Path) -> set[str]:
    """Return the run-config keys the app in ``app_dir`` declares (``[tool.flwr.app.config]``)."""
    text = (app_dir / "pyproject.toml").read_text()
    return _flat(tomllib.loads(text)["tool"]["flwr"]["app"].get("config", {}))


def _staged_app(app_dir: Path, run_config: Mapping[str, ConfigValue], out: Path) -> Path | None:
    """Return a copy of the app's pyproject.toml declaring ``run_config``'s missing keys.

    None if the app's ``[tool.flwr.app.config]`` already lists every key.
    """
    declared = app_config_keys(app_dir)
    missing = {k: v for k, v in run_config.items() if k not in declared}
    if not missing:
        return None
    lines = (app_dir / "pyproject.toml").read_text().splitlines()
    at = lines.index(APP_CONFIG_HEADER) + 1
    lines[at:at] = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in missing.items()]
    out.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix="app-", dir=out))
    (staged / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return staged


def _flat(table: Mapping[str, object], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in table.items():
        if isinstance(value, Mapping):
            keys |= _flat(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys
