"""Checkpoints: a resumed run ends on the very model an uninterrupted run ends on."""

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message

from fedsim.algorithm import ClientAction
from fedsim.cli import main
from fedsim.clients import TorchClient, make_client_app
from fedsim.config import load_config
from fedsim.engine import InlineGrid
from fedsim.experiment import build_task, run_on_grid
from fedsim.strategies.scaffold import SCAFFOLD, scaffold

# 10 workers, all in each round, tiny MLP: strategies with server and client state.
SMALL = [
    "data.num_clients=10", "strategy.clients_per_round=10", "model.name=mlp",
    "data.partitioner=qsplit", "data.q=0.5", "client.batch_size=16", "strategy.local_steps=3",
    "strategy.stage_rounds=4", "eval_every=100", "progress=false", "plot=false",
]  # fmt: skip
CONFIG = "experiments/configs/demo.toml"


def _run(tmp_path: Path, name: str, *overrides: str, resume: bool = False) -> int:
    sets = [f"output_dir={tmp_path}", f"name={name}", *SMALL, *overrides]
    args = ["run", CONFIG, *[a for s in sets for a in ("--set", s)]]
    return main([*args, "--resume"] if resume else args)


@pytest.mark.parametrize(
    "strategy", ["fedavg", "bvr-l-sgd", "scaffold"], ids=["fedavg", "bvr", "scaffold"]
)
@pytest.mark.parametrize("devices", [False, True], ids=["plain", "devices"])
def test_resuming_gives_the_uninterrupted_model_bit_for_bit(
    tmp_path: Path, strategy: str, devices: bool
) -> None:
    common = [f"strategy.name={strategy}", f"devices.enabled={str(devices).lower()}"]
    assert _run(tmp_path, "straight", "rounds=6", *common) == 0
    assert _run(tmp_path, "resumed", "rounds=3", *common) == 0
    assert _run(tmp_path, "resumed", "rounds=6", *common, resume=True) == 0
    straight = torch.load(tmp_path / "straight" / "model.pt")
    resumed = torch.load(tmp_path / "resumed" / "model.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert [row["round"] for row in rows] == list(range(7))
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["rounds"] == 6 and summary["status"] == "completed"


def test_a_crashed_run_resumes_after_its_last_finished_round(tmp_path: Path) -> None:
    overrides = [f"output_dir={tmp_path}", *SMALL, "strategy.name=scaffold", "rounds=5"]
    config = load_config(CONFIG, [*overrides, "name=crashed"])

    def crashes_in_round_four(client: TorchClient, message: Message, context: Context) -> Message:
        if message.content["config"]["server-round"] == 4:
            raise KeyboardInterrupt
        return scaffold(client, message, context)

    class CrashingSCAFFOLD(SCAFFOLD):
        client_actions = (ClientAction("train.scaffold", crashes_in_round_four),)

    app = make_client_app(build_task(config), algorithms=[CrashingSCAFFOLD])
    grid = InlineGrid(app, num_nodes=config.data.num_clients)
    with pytest.raises(KeyboardInterrupt):
        run_on_grid(config, grid, engine="inline")
    assert _run(tmp_path, "crashed", "strategy.name=scaffold", "rounds=5", resume=True) == 0
    assert _run(tmp_path, "straight", "strategy.name=scaffold", "rounds=5") == 0
    crashed = torch.load(tmp_path / "crashed" / "model.pt")
    straight = torch.load(tmp_path / "straight" / "model.pt")
    assert all(torch.equal(crashed[k], straight[k]) for k in straight)
    rows = [json.loads(line) for line in (tmp_path / "crashed" / "metrics.jsonl").open()]
    assert [row["round"] for row in rows] == list(range(6))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rounds=3", "client.lr=0.5"], "client differ"),
        (["rounds=2"], "already has 2 rounds"),
    ],
)
def test_resume_refuses_other_settings_and_nothing_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    assert _run(tmp_path, "run", "rounds=2") == 0
    assert _run(tmp_path, "run", *overrides, resume=True) == 2
    assert message in capsys.readouterr().err


def test_resume_without_a_checkpoint_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, "never-ran", "rounds=2", resume=True) == 2
    assert "nothing to resume" in capsys.readouterr().err
