"""A real kill on the Ray engine: the driver SIGKILLed mid-round resumes bit for bit.

As ``tests/test_sigkill.py`` does inline, through the same wrapper: the driver is
held after the first reply of round 3 while Ray's actors still train, and killed.
Ray's own processes (GCS, raylet, workers) are the driver's descendants and outlive
it; the test collects them before the kill and stops them by PID after, never by
name. Two Ray starts make this the costly one (about a minute on 2 cores).
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsim.cli import main
from fedsim.processes import kill_if_alive, process_tree
from tests.test_sigkill import (
    KILLED_IN,
    _args,
    _assert_nothing_half_written,
    _assert_resumed_to,
    _sigkill,
    _start_killable,
    _wait_for_marker,
)


def _started_at(pid: int) -> bytes | None:
    """Return when ``pid`` started (``/proc/<pid>/stat`` field 22), None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2 :].split()[19]


class _Started:
    """The processes a test started: session leaders, and all their sessions hold.

    Each is stopped by PID, and only while it is the process recorded (same start
    time): a PID the system has reused since is left alone.
    """

    def __init__(self) -> None:
        self.leaders: list[int] = []
        self.pids: dict[int, bytes | None] = {}

    def add(self, leader: int) -> None:
        """Record ``leader`` (started with ``start_new_session``) and its tree as it is now."""
        if leader not in self.leaders:
            self.leaders.append(leader)
        for pid in process_tree(leader):  # the first start time seen is the one it had
            self.pids.setdefault(pid, _started_at(pid))

    def stop(self) -> None:
        """SIGKILL what is left of them, its session included; wait until they are gone."""
        for leader in self.leaders:  # a dead leader's session still names what it left
            self.add(leader)
        deadline = time.monotonic() + 10
        while alive := [pid for pid, at in self.pids.items() if at and _started_at(pid) == at]:
            if time.monotonic() > deadline:
                pytest.fail(f"processes {alive} outlived SIGKILL")
            for pid in alive:
                kill_if_alive(pid)
            time.sleep(0.2)


@pytest.fixture
def started() -> Iterator[_Started]:
    """What the test starts; anything of it still alive at the end is killed."""
    processes = _Started()
    yield processes
    processes.stop()


@pytest.mark.slow
def test_a_kill_mid_round_on_ray_resumes_bit_for_bit(tmp_path: Path, started: _Started) -> None:
    ray, one_thread = ("engine.name=ray", "engine.num_actors=1"), {"OMP_NUM_THREADS": "1"}
    process = _start_killable(tmp_path, "ray-mid-round", *ray, env=one_thread)
    started.add(process.pid)
    _wait_for_marker(process, tmp_path / "ray-mid-round.marker", timeout=180)
    # Ray's GCS, raylet and workers are the driver's descendants: once it is killed
    # they are re-parented, so they are collected first, and stopped by PID after.
    started.add(process.pid)

    _sigkill(process)
    started.stop()  # before the resumed run starts a Ray of its own

    run = tmp_path / "ray-mid-round"
    _assert_nothing_half_written(run, KILLED_IN - 1)
    resumed = subprocess.Popen(
        [sys.executable, "-m", "fedsim.cli", *_args(tmp_path, "ray-mid-round", *ray), "--resume"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **one_thread},
    )
    started.add(resumed.pid)  # a clean run stops its Ray; the session finds what it left
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-3000:]
    assert main(_args(tmp_path, "straight")) == 0  # inline: the engines agree bit for bit
    _assert_resumed_to(run, tmp_path / "straight")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["engine"] == "ray" and summary["ray_actors"] == 1
    assert summary["ray_startup_s"] > 0
