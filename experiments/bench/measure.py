"""Child processes and their memory: spawning a run and sampling its process tree.

This module holds how the parent runs each system: ``spawn`` starts ``engines.py --run ...``
in a session of its own, samples the summed resident memory of the child's whole process tree
(read from ``/proc``) until it exits, ends what it left behind (Ray daemons), and parses the
result line the child printed. It is apart from ``engines.py`` because it is Linux process
plumbing, independent of the systems and of torch, and tested on its own.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.processes import process_table, process_tree

REPO = Path(__file__).resolve().parents[2]
ENTRY = Path(__file__).resolve().with_name("engines.py")  # what spawn runs, with --run
RESULT, SKIPPED = "BENCH_RESULT ", "BENCH_SKIPPED "
SAMPLE_S = 0.05
REFRESH_EVERY = 5  # samples between listings of /proc (each costs about 1 ms)
CHILD_TIMEOUT_S = 600


def rss_bytes(pids: set[int]) -> int:
    """Return the summed resident set size of those of ``pids`` that still exist."""
    page, total = os.sysconf("SC_PAGE_SIZE"), 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as statm:
                total += int(statm.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


@dataclass
class ChildRun:
    """What one child process reported, and the peak memory of its tree."""

    result: dict[str, Any] | None
    peak_rss_mb: float
    skipped: str | None = None
    error: str | None = None


def spawn(child_args: Sequence[str], *, env_extra: dict[str, str] | None = None) -> ChildRun:
    """Run ``engines.py`` with ``child_args`` in a new session, sampling its tree's memory."""
    env = {
        **os.environ,
        **(env_extra or {}),
        # Ray workers import experiments.bench.workload to unpickle the client task.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        # No network here: keep Flower and Ray from trying to report usage.
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    command = [sys.executable, str(ENTRY), *child_args]
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        peak, deadline, tree = 0, time.monotonic() + CHILD_TIMEOUT_S, {child.pid}
        for sample in itertools.count():
            if child.poll() is not None:
                break
            if sample % REFRESH_EVERY == 0:
                tree = process_tree(child.pid)
            peak = max(peak, rss_bytes(tree))
            if time.monotonic() > deadline:
                os.killpg(child.pid, signal.SIGKILL)
            time.sleep(SAMPLE_S)
        _end_leftovers(child.pid)
        log.seek(0)
        output = log.read()
    run = ChildRun(result=None, peak_rss_mb=peak / 2**20)
    for line in output.splitlines():
        if line.startswith(RESULT):
            run.result = json.loads(line[len(RESULT) :])
        elif line.startswith(SKIPPED):
            run.skipped = line[len(SKIPPED) :]
    if run.result is None and run.skipped is None:
        tail = "\n".join(output.splitlines()[-25:])
        run.error = f"exit code {child.returncode}; the end of its output:\n{tail}"
    return run


def _end_leftovers(session: int, grace_s: float = 5.0) -> None:
    """Stop, by pid, processes a finished child left in its session (Ray daemons)."""
    deadline = time.monotonic() + grace_s
    while left := [pid for pid, (_, sid) in process_table().items() if sid == session]:
        if time.monotonic() > deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            return
        time.sleep(0.2)
