"""A real kill: SIGKILL a ``fedsim run`` process where it hurts most, then ``--resume``.

Each killed run is its own process, started through a wrapper written here that
patches the one function at its kill point (no test hooks in the library): it
writes half of what that point writes, touches a marker file and sleeps. The test
waits for the marker and SIGKILLs that PID. The folder must then hold no
half-written result (every JSON file parses, the checkpoint and model load, partial
files are hidden and named apart), ``metrics.jsonl`` may lose only the round in
flight, and a plain ``fedsim run --resume`` must end on the uninterrupted run's
model bit for bit, with every round in ``metrics.jsonl`` exactly once.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedsim.checkpoint import RunCheckpoint
from fedsim.cli import main
from fedsim.config import ConfigError
from fedsim.processes import kill_if_alive
from fedsim.results import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, RUN_FILES, read_metrics
from tests.conftest import DEMO_CONFIG

ROUNDS, KILLED_IN = 4, 3
SMALL = (
    f"rounds={ROUNDS}", "model.name=mlp", "data.num_clients=20", "strategy.clients_per_round=5",
    "client.local_epochs=1", "progress=false", "engine.torch_threads=1",
)  # fmt: skip
# The kill points, each with the round its checkpoint holds when the kill lands.
POINTS = {
    "mid-round": KILLED_IN - 1,  # one client of round 3 has replied, the rest are training
    "metrics-append": KILLED_IN - 1,  # half of round 3's line is in metrics.jsonl
    "checkpoint-write": KILLED_IN - 1,  # half of round 3's checkpoint is on disk
    "summary-write": ROUNDS,  # the last round is saved; half of summary.json is written
    "model-write": ROUNDS,  # the summary is written; half of model.pt is
}
WRAPPER = f"""
import io, json, sys, time
from pathlib import Path

import torch

marker, point, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]


def hold():
    marker.touch()
    time.sleep(600)  # until the test's SIGKILL


def half_written(data, path):
    with open(path, "wb") as file:
        file.write(data[: len(data) // 2])
        file.flush()
    hold()


def hold_mid_round(grid_class):
    real = grid_class.stream_replies

    def stream_replies(self, messages, **kwargs):
        messages = list(messages)
        killed = any(
            m.metadata.message_type == "train"
            and m.content["config"]["server-round"] == {KILLED_IN}
            for m in messages
        )
        for reply in real(self, messages, **kwargs):
            yield reply
            if killed:
                hold()

    grid_class.stream_replies = stream_replies


real_save = torch.save


def save(obj, file, *args, **kwargs):
    name = Path(file).name if isinstance(file, (str, Path)) else ""
    checkpoint = isinstance(obj, dict) and obj.get("round") == {KILLED_IN} and "checkpoint" in name
    if (point == "checkpoint-write" and checkpoint) or (point == "model-write" and "model" in name):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        half_written(buffer.getvalue(), file)
    real_save(obj, file, *args, **kwargs)


real_write_text = Path.write_text


def write_text(self, data, *args, **kwargs):
    if point == "summary-write" and "summary" in self.name:
        half_written(data.encode(), self)
    return real_write_text(self, data, *args, **kwargs)


torch.save, Path.write_text = save, write_text
if point == "mid-round":
    from fedsim.engine.inline import InlineGrid

    hold_mid_round(InlineGrid)
if point == "ray-mid-round":
    from fedsim.engine.ray_grid import RayGrid

    hold_mid_round(RayGrid)
if point == "metrics-append":
    from fedsim.results import METRICS_FILE, RunRecorder

    real_on_round = RunRecorder.on_round

    def on_round(self, report):
        if report.round == {KILLED_IN}:
            line = json.dumps(report.as_row()) + "\\n"
            with (self.run_dir / METRICS_FILE).open("a") as metrics:
                metrics.write(line[: len(line) // 2])
            hold()
        real_on_round(self, report)

    RunRecorder.on_round = on_round

from fedsim.cli import main

sys.exit(main(argv))
"""


def _args(out: Path, name: str, *extra: str) -> list[str]:
    sets = (f"output_dir={out}", f"name={name}", *SMALL, *extra)
    return ["run", DEMO_CONFIG, *[arg for s in sets for arg in ("--set", s)]]


def _start_killable(
    out: Path, point: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``fedsim run`` through the wrapper, in a session of its own."""
    wrapper = out / "wrapper.py"
    if not wrapper.exists():
        wrapper.write_text(WRAPPER)
    marker = out / f"{point}.marker"
    with (out / f"{point}.log").open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, str(wrapper), str(marker), point, *_args(out, point, *extra)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )


def _wait_for_marker(process: subprocess.Popen[bytes], marker: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            kill_if_alive(process.pid)
            process.wait()
            log = marker.with_suffix(".log").read_text()[-3000:]
            pytest.fail(f"{marker.stem} never reached its kill point: {log}")
        time.sleep(0.05)


def _sigkill(process: subprocess.Popen[bytes]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def _assert_nothing_half_written(run: Path, saved_round: int) -> None:
    """Every result file is complete; what a kill cut short is hidden, named apart."""
    visible = {path.name for path in run.iterdir() if not path.name.startswith(".")}
    assert visible <= set(RUN_FILES), visible
    for name in visible & {"config.json", "summary.json"}:
        json.loads((run / name).read_text())
    saved = RunCheckpoint(run / CHECKPOINT_FILE).load()
    assert saved is not None and saved.round == saved_round
    if (run / MODEL_FILE).exists():
        torch.load(run / MODEL_FILE)
    lines = (run / METRICS_FILE).read_text().splitlines()
    rows = [json.loads(line) for line in lines[:-1]]
    try:
        rows.append(json.loads(lines[-1]))
    except ValueError:  # a kill mid-append cuts the last line, and only that one
        pass
    # Every finished round is there; at most the one in flight is lost.
    assert [row["round"] for row in rows] in (
        list(range(saved_round + 1)),
        list(range(saved_round + 2)),
    )


def _assert_resumed_to(run: Path, reference: Path) -> None:
    """The resumed run ended on the uninterrupted model, every round recorded once."""
    assert {path.name for path in run.iterdir()} <= set(RUN_FILES)  # partial files gone
    straight, resumed = torch.load(reference / MODEL_FILE), torch.load(run / MODEL_FILE)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == ROUNDS


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the same config."""
    out = tmp_path_factory.mktemp("straight")
    assert main(_args(out, "straight")) == 0
    return out / "straight"


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Start one run per kill point (together: their start-up overlaps); kill each there."""
    out = tmp_path_factory.mktemp("killed")
    runs = {point: _start_killable(out, point) for point in POINTS}
    try:
        for point, process in runs.items():
            _wait_for_marker(process, out / f"{point}.marker", timeout=180)
            _sigkill(process)
    finally:  # a run that failed to reach its point must not outlive the test
        for process in runs.values():
            if process.poll() is None:
                kill_if_alive(process.pid)
                process.wait()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_a_kill_costs_at_most_the_round_in_flight_and_resumes_bit_for_bit(
    killed: Path, reference: Path, point: str
) -> None:
    _assert_nothing_half_written(killed / point, POINTS[point])

    assert main([*_args(killed, point), "--resume"]) == 0

    _assert_resumed_to(killed / point, reference)


def test_a_metrics_line_cut_short_at_the_end_is_dropped(tmp_path: Path) -> None:
    metrics = tmp_path / METRICS_FILE
    metrics.write_text('{"round": 0}\n{"round": 1}\n{"round": 2, "cen')
    assert read_metrics(metrics) == [{"round": 0}, {"round": 1}]


def test_a_damaged_metrics_line_elsewhere_is_one_line(tmp_path: Path) -> None:
    metrics = tmp_path / METRICS_FILE
    metrics.write_text('{"round": 0}\n{"rou\n{"round": 2}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl line 2 is not JSON: '\{\"rou'"):
        read_metrics(metrics)
