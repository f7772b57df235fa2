"""Joining an existing Ray cluster (``engine.address``).

This lives in its own module on purpose: ``ray stop --force`` ends every raylet on
the machine, and a process that is itself a Ray driver exits when its raylet dies.
Here no test of this module starts Ray in the pytest process, and the module runs
before test_ray_engine.py, whose fixture does.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray

from tests.conftest import run_cli


def test_this_process_is_not_a_ray_driver() -> None:
    assert not ray.is_initialized()


@pytest.mark.slow
def test_joins_an_existing_ray_cluster(tmp_path: Path) -> None:
    ray_cli = Path(sys.executable).with_name("ray")
    port = "6391"
    # Ray's socket paths must fit AF_UNIX's 107 bytes: pytest's tmp_path is too deep.
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    started = subprocess.run(
        [
            str(ray_cli),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={ray_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        done = run_cli(
            "rounds=2", "data.num_clients=6", "strategy.clients_per_round=3", "engine.name=ray",
            f"engine.address=127.0.0.1:{port}", f"output_dir={tmp_path}", "name=joined",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(ray_dir, ignore_errors=True)
    summary = json.loads((tmp_path / "joined" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["ray_actors"] == 2
