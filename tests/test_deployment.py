"""A real localhost deployment: a TLS SuperLink, three authenticated SuperNodes, `flwr run`.

Each SuperNode runs every ClientApp call in a fresh ``flwr-clientapp`` process, with
one torch thread (``LocalFederation.torch_threads``); the inline engine with
``engine.torch_threads=1`` runs the same seeded computation, so the final models
agree bit for bit: client seeds derive from the partition id (the SuperNode's
``--node-config``), never from Flower's random node ids, and the weighted mean sums
in float64 whatever order the replies arrive in. (SCAFFOLD's per-node state across
those processes, and nodes reading their own files: tests/test_deploy_cli.py.)

Apple's stack agrees bit for bit too: secure aggregation's keys are fresh in every
process, but the unmasked sum is exact in its field, the local privatizer's and the
central noise's draws are seeded from (seed, round, partition), and a fixed-size
cohort of every node is the same set whatever the node ids.
"""

import json
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

from fedsim.cli import main
from fedsim.deploy.credentials import write_supernode_keys
from fedsim.deploy.localhost import (
    CONNECTION,
    ConfigValue,
    LocalFederation,
    _staged_app,
    _toml_value,
)
from fedsim.processes import process_tree

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "configs" / "demo.toml"
NODES = 3
SETTINGS: dict[str, ConfigValue] = {
    "rounds": 3,
    "data.num_clients": NODES,
    "strategy.clients_per_round": NODES,
    "model.name": "mlp",
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(nodes=NODES, root=tmp_path_factory.mktemp("federation")) as federation:
        yield federation


def _inline_model(
    out: Path, settings: Mapping[str, ConfigValue] = SETTINGS
) -> dict[str, torch.Tensor]:
    sets = [f"{key}={_toml_value(value)}" for key, value in settings.items()]
    sets += ['name="inline"', f"output_dir={json.dumps(str(out))}", "engine.torch_threads=1"]
    argv = ["run", str(DEMO)]
    for setting in sets:
        argv += ["--set", setting]
    assert main(argv) == 0
    return torch.load(out / "inline" / "model.pt", weights_only=True)


@pytest.mark.slow
def test_a_supernode_with_an_unregistered_key_is_refused(federation: LocalFederation) -> None:
    [stranger] = write_supernode_keys(federation.logs.parent / "stranger", 1)

    supernode = federation.start_supernode(stranger, partition_id=0, name="stranger")
    returncode = supernode.wait(timeout=60)

    # Flower logs exit code 305 (SUPERNODE_CONNECTION_ERROR) after the SuperLink's
    # ApiError 2004, but the process itself exits 1, from uvicorn's shutdown.
    log = (federation.logs / "stranger.log").read_text()
    assert returncode != 0 and "Exit Code: 305" in log and "[code: 2004]" in log, log[-2000:]
    superlink_log = (federation.logs / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log


@pytest.mark.slow
def test_a_supernode_killed_mid_round_is_a_counted_failure_and_rejoins_with_its_key(
    federation: LocalFederation, tmp_path: Path
) -> None:
    # Flower 1.41: a SIGKILLed SuperNode sends no more heartbeats (every 30 s); the
    # SuperLink counts it online for two of them, then answers each message still
    # addressed to it with a NODE_UNAVAILABLE error reply, which the ServerApp's
    # Grid pulls like any reply. The round ends about a minute after the kill.
    victim = NODES - 1
    log = federation.logs / f"{federation.keys[victim].name}.log"
    run_id = federation.submit(REPO, {**SETTINGS, "rounds": 1, "name": "killed",
                                      "output_dir": str(tmp_path)})  # fmt: skip
    _wait_for_text(log, f"[RUN {run_id}]", timeout_s=180)  # the victim has its message

    federation.kill_supernode(victim)
    status = federation.wait(run_id, timeout_s=300)

    assert status == "finished:completed", _tail(federation.logs / "flwr-cli.log")
    [_, killed] = _metrics(tmp_path / "killed")
    assert killed["replies"] == NODES and killed["failures"] == 1, killed
    assert "Node Unavailable" in (federation.logs / f"run-{run_id}.log").read_text()

    # The same key is admitted again, now that the SuperLink counts the node offline.
    superlink_log = federation.logs / "superlink.log"
    before = superlink_log.stat().st_size
    activations = log.read_text().count("SuperNode ID")
    federation.restart_supernode(victim)
    _wait_for_text(log, "SuperNode ID", timeout_s=60, after=activations)
    listed = federation.flwr("supernode", "list", CONNECTION, "--format", "json")

    assert "No SuperNode found" not in superlink_log.read_text()[before:]
    statuses = [node["status"] for node in json.loads(listed.stdout)["nodes"]]
    assert statuses.count("online") == NODES, listed.stdout
    assert federation.supernodes[victim].poll() is None
    # It trains again in the next test: secure aggregation needs every node's four replies.


# Apple's stack from the config (privacy.md): each SuperNode privatizes its update
# (PrivUnit2 + ScalarDP), clips it and masks it; the SuperLink's ServerApp sees only
# masked vectors, unmasks the sum, noises it and accounts.
PRIVATE: dict[str, ConfigValue] = {
    **SETTINGS,
    "rounds": 1,
    "privacy.secure_aggregation": True,
    "privacy.local_dp": True,
    "privacy.central_dp": True,
    "privacy.sampling": "fixed",
    "privacy.clip_norm": 0.5,
}


@pytest.mark.slow
def test_secure_aggregation_with_local_and_central_dp_across_supernodes(
    federation: LocalFederation, tmp_path: Path
) -> None:
    status = federation.run(REPO, {**PRIVATE, "name": "private", "output_dir": str(tmp_path)})

    assert status == "finished:completed", _tail(federation.logs / "flwr-cli.log")
    run = tmp_path / "private"
    [_, round_1] = _metrics(run)
    assert round_1["exchanges"] == 4 and round_1["replies"] == 4 * NODES, round_1
    assert round_1["train_secagg-survivors"] == NODES and round_1["privacy_epsilon"] > 0
    assert "train_loss" not in round_1  # no per-client metric left a SuperNode
    deployed = torch.load(run / "model.pt", weights_only=True)
    inline = _inline_model(tmp_path / "inline-runs", PRIVATE)
    for name, tensor in inline.items():
        assert torch.equal(deployed[name], tensor), name


def _metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _tail(log: Path) -> str:
    return log.read_text()[-2000:]


def _wait_for_text(log: Path, text: str, *, timeout_s: float, after: int = 0) -> None:
    """Wait until ``log`` holds more than ``after`` occurrences of ``text``."""
    deadline = time.monotonic() + timeout_s
    while log.read_text(errors="replace").count(text) <= after:
        assert time.monotonic() < deadline, f"no {text!r} in {log.name}: {_tail(log)}"
        time.sleep(0.5)


def test_keys_the_app_does_not_declare_go_into_a_staged_pyproject(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        '[tool.flwr.app.config]\nrounds = 3\n"data.num_clients" = 10\n\n[tool.other]\nx = 1\n'
    )

    assert _staged_app(app, {"rounds": 5, "data.num_clients": 3}, tmp_path / "s") is None
    staged = _staged_app(app, {"rounds": 5, "model.name": "mlp", "x": True}, tmp_path / "s")

    assert staged is not None
    text = (staged / "pyproject.toml").read_text()
    assert text.startswith('[tool.flwr.app.config]\n"model.name" = "mlp"\n"x" = true\nrounds = 3\n')


def test_stopping_kills_each_process_group_even_when_it_ignores_sigterm(tmp_path: Path) -> None:
    federation = LocalFederation(nodes=1, root=tmp_path, grace_s=0.5)
    federation.logs.mkdir(parents=True)
    # A shell that ignores SIGTERM, with a child in its group.
    stubborn = federation._spawn("stubborn", ["sh", "-c", "trap '' TERM; sleep 60 & wait"])
    deadline = time.monotonic() + 10
    while not (children := process_tree(stubborn.pid) - {stubborn.pid}):
        assert time.monotonic() < deadline, "the shell started no child"
        time.sleep(0.05)
    [child] = children

    federation._stop()

    assert stubborn.poll() == -signal.SIGKILL
    deadline = time.monotonic() + 5  # a SIGKILL is delivered, not awaited: allow it to land
    while not _gone(child):
        assert time.monotonic() < deadline, f"{child} still runs"
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent, or a zombie that init has yet to reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")
