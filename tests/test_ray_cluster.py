"""Joining an existing Ray cluster (``engine.address``).

The test starts its own head with ``ray start --head --block`` in a new session, on free
ports, and stops it by that session alone: SIGTERM to the session's process group, SIGKILL
to what is left, then a check in ``/proc`` that nothing of the session survives. Ray's
daemons and workers do not leave the session their ``ray start`` runs in, so other Ray
clusters on the machine are never touched (``ray stop`` would end every one of them).

The module keeps the rule it was split off for: no test here starts Ray in the pytest
process (test_ray_engine.py's fixture does, and this module runs before it), so the only
Ray this test meets is the cluster it starts.
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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import ray

from fedsim.processes import process_tree
from tests.conftest import run_cli

START_TIMEOUT_S = 120
STOP_GRACE_S = 15


def test_this_process_is_not_a_ray_driver() -> None:
    assert not ray.is_initialized()


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that no process holds now (the kernel's picks)."""
    with ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:  # all bound at once, so the kernel cannot pick one port twice
            probe.bind(("", 0))
        return [probe.getsockname()[1] for probe in probes]


def _session_left(session: int) -> set[int]:
    """Return the processes still alive in ``session`` (its leader, once reaped, excluded)."""
    return process_tree(session) - {session}


def _stop_session(head: subprocess.Popen[bytes]) -> None:
    """SIGTERM the head's process group, then SIGKILL what remains of it after a grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:  # every process of the group has ended
            pass
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            if head.poll() is not None and not _session_left(head.pid):
                return
            time.sleep(0.2)


@contextmanager
def _ray_head(ray_dir: str) -> Iterator[str]:
    """Run a one-node Ray cluster in a session of its own; yield its GCS address.

    Every fixed port ``ray start`` would take by default (6379, 10001, 8265, 52365, the
    worker range 10002-19999) is one the kernel picked free instead, so another cluster on
    the machine neither blocks this one nor is joined by it. ``--block`` keeps ``ray start``
    alive as the session leader: Ray 2.55's GCS, raylet, agents, client server, monitors and
    every worker the raylet forks stay in its session and its process group, whose id is its
    pid, as ``/proc/<pid>/stat`` shows while it runs.
    """
    gcs, client_server, dashboard, dashboard_agent = _free_ports(4)
    address = f"127.0.0.1:{gcs}"
    ray_cli = Path(sys.executable).with_name("ray")
    command = [
        str(ray_cli), "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
        "--include-dashboard=false", f"--temp-dir={ray_dir}", f"--port={gcs}",
        f"--ray-client-server-port={client_server}", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={dashboard_agent}",
        "--min-worker-port=0", "--max-worker-port=0",  # 0: each worker binds a free port
    ]  # fmt: skip
    log_path = Path(ray_dir) / "ray_start.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until_up(head, address, log_path)
        yield address
    finally:
        _stop_session(head)
    survivors = _session_left(head.pid)
    assert not survivors, f"Ray processes outlived their session: {sorted(survivors)}"


def _wait_until_up(head: subprocess.Popen[bytes], address: str, log_path: Path) -> None:
    """Poll ``ray status`` until the cluster answers; fail if ``ray start`` exits first."""
    ray_cli = Path(sys.executable).with_name("ray")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log_path.read_text()}")
        status = subprocess.run(
            [str(ray_cli), "status", f"--address={address}"], capture_output=True, timeout=60
        )
        if status.returncode == 0:
            return
        time.sleep(1)
    pytest.fail(f"no Ray cluster at {address} after {START_TIMEOUT_S} s:\n{log_path.read_text()}")


@pytest.mark.slow
def test_joins_an_existing_ray_cluster(tmp_path: Path) -> None:
    # Ray's socket paths must fit AF_UNIX's 107 bytes: pytest's tmp_path is too deep.
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        with _ray_head(ray_dir) as address:
            done = run_cli(
                "rounds=2", "data.num_clients=6", "strategy.clients_per_round=3",
                "engine.name=ray", f"engine.address={address}", f"output_dir={tmp_path}",
                "name=joined",
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    summary = json.loads((tmp_path / "joined" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["ray_actors"] == 2
