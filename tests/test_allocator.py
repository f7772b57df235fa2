"""glibc's malloc thresholds: fixed for fedsim's process and the processes it starts."""

import os
import platform
import subprocess
import sys

import pytest

from fedsim.allocator import TUNABLES

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

# Run in a fresh interpreter: pinning changes the calling process for good.
PIN_AND_REPORT = """
import os, subprocess, sys
from fedsim.allocator import pin_malloc_thresholds
print(pin_malloc_thresholds())
print(os.environ.get("GLIBC_TUNABLES"))
child = [sys.executable, "-c", "import os; print(os.environ.get('GLIBC_TUNABLES'))"]
print(subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip())
"""


def _pin_in_fresh_process(glibc_tunables: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if glibc_tunables is not None:
        env["GLIBC_TUNABLES"] = glibc_tunables
    done = subprocess.run(
        [sys.executable, "-c", PIN_AND_REPORT], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def test_pinning_applies_here_and_to_processes_started_afterwards() -> None:
    # True means glibc accepted both mallopt calls; children (Ray's workers) read the
    # same thresholds from GLIBC_TUNABLES when they start.
    assert _pin_in_fresh_process(None) == ["True", TUNABLES, TUNABLES]


def test_a_users_own_tunables_are_left_alone() -> None:
    mine = "glibc.malloc.arena_max=2"
    assert _pin_in_fresh_process(mine) == ["False", mine, mine]
