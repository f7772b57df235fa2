"""Shared fixtures: small Flower messages and a throwaway run directory."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedsim.arrays import to_array_record
from fedsim.engine.identity import claim_server_identity


@pytest.fixture(autouse=True)
def _server_identity() -> None:
    # Message(...) needs a task identity; engines set it, bare unit tests set it here.
    claim_server_identity(run_id=1)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread for the test, then restore its thread count.

    The thread count changes float reduction order in kernels, so a run compared
    bit for bit with one on 1-thread workers (threads engine, Ray actors) uses one
    thread too.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reply(node_id: int, arrays: dict[str, np.ndarray] | None, **metrics: float) -> Message:
    """A train/evaluate reply from ``node_id`` carrying ``arrays`` and ``metrics``."""
    instruction = Message(RecordDict(), node_id, "train")
    instruction.metadata.__dict__["_message_id"] = f"m{node_id}"
    content = RecordDict({"metrics": MetricRecord(dict(metrics))})
    if arrays is not None:
        content["arrays"] = to_array_record(arrays)
    return Message(content, reply_to=instruction)


def arrays_record(**arrays: np.ndarray) -> ArrayRecord:
    return to_array_record(arrays)


DEMO_CONFIG = "experiments/configs/demo.toml"


def run_cli(
    *overrides: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``fedsim run <demo config> --set KEY=VALUE ...`` in a fresh interpreter.

    For tests that need their own process: env vars read at import (offline
    switches, torch threads) or Ray, which must not live in the pytest process.
    """
    sets = [arg for override in ("progress=false", *overrides) for arg in ("--set", override)]
    command = [sys.executable, "-m", "fedsim.cli", "run", DEMO_CONFIG, *sets]
    return subprocess.run(
        command, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def run_script(
    script: Path, *args: str, timeout: float = 300, cwd: Path | None = None, returncode: int = 0
) -> subprocess.CompletedProcess[str]:
    """Run ``python SCRIPT ARGS`` in the repository root (or ``cwd``), as a user runs experiments.

    Its own interpreter: experiment scripts start process pools, which must not
    live in the pytest process. Fails the test with the output's tail if it exits
    with another code than ``returncode``.
    """
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd or Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == returncode, done.stdout[-3000:] + done.stderr[-3000:]
    return done
