"""Every shipped strategy x every privacy option: it runs and shows it, or it is refused.

No combination may run without the protection it asks for. A refusal is
``load_config``'s one line, before any work; a combination that runs reports
its option's evidence in ``metrics.jsonl`` and ``summary.json``: the ε of a DP
option, the survivors whose masked updates secure aggregation summed. The table
in ``docs/privacy.md`` is checked against what happens.
"""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import Message, MessageType, RecordDict

from fedsim import keys
from fedsim.algorithm import PRIVACY_OPTIONS
from fedsim.app import client_app_for
from fedsim.clients import make_client_app
from fedsim.config import ConfigError, flatten, load_config
from fedsim.engine import InlineGrid
from fedsim.experiment import build_task, client_mods, initial_arrays, run_on_grid
from fedsim.registry import STRATEGIES
from fedsim.runner import run_experiment
from fedsim.strategies import SCAFFOLD, FedAvg
from tests.conftest import DEMO_CONFIG

REPO = Path(__file__).resolve().parents[1]
#: What each option reports: (metrics.jsonl column, summary.json key of its last value).
EVIDENCE_OF = {
    "client.dp_sgd": ("train_dp-epsilon", "dp_epsilon"),
    "privacy.local_dp": ("train_ldp-epsilon", "ldp_epsilon"),
    "privacy.central_dp": ("privacy_epsilon", "epsilon"),
    "privacy.secure_aggregation": ("train_secagg-survivors", None),
}
TINY = [
    "rounds=2", "data.num_clients=8", "strategy.clients_per_round=4", "model.name=logreg",
    "client.local_epochs=1", "strategy.stage_rounds=2", "progress=false", "plot=false",
    "checkpoint_every=0",
]  # fmt: skip


def _documented() -> dict[tuple[str, str], bool]:
    """The support table of docs/privacy.md: (strategy, option) -> supported."""
    text = (REPO / "docs" / "privacy.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| strategy |"))
    options = [cell.strip(" `") for cell in header.strip("|").split("|")[1:]]
    table = {}
    for line in text.splitlines():
        match = re.match(r"\| `([a-z-]+)` \|(.*)\|$", line)
        if match and match.group(1) in STRATEGIES:
            cells = [cell.strip() for cell in match.group(2).split("|")]
            for option, cell in zip(options, cells, strict=True):
                table[(match.group(1), option)] = cell.startswith("yes")
    return table


def test_the_docs_table_covers_every_combination() -> None:
    assert set(_documented()) == {(s, o) for s in STRATEGIES for o in PRIVACY_OPTIONS}


@pytest.mark.parametrize("option", list(PRIVACY_OPTIONS))
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_privacy_option_is_honoured_with_its_evidence_or_refused_up_front(
    strategy: str, option: str, tmp_path: Path
) -> None:
    sets = [*TINY, f"strategy.name={strategy}", f"{option}=true", f"output_dir={tmp_path}"]
    try:
        config = load_config(DEMO_CONFIG, sets)
    except ConfigError as refusal:
        assert not _documented()[(strategy, option)], f"refused but documented: {refusal}"
        message = str(refusal)
        assert "\n" not in message and message.startswith(f"{option} = true is refused")
        assert not (tmp_path / "demo").exists()  # before any work
        return
    assert _documented()[(strategy, option)], "runs but documented as refused"
    summary = run_experiment(config)
    column, key = EVIDENCE_OF[option]
    rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").open()][1:]
    assert rows and all(row[column] > 0 for row in rows), rows
    if key is not None:
        assert summary[key] == rows[-1][column] > 0


def test_a_mod_refuses_at_start_up_a_message_type_it_is_not_written_for() -> None:
    config = load_config(DEMO_CONFIG, [*TINY, "privacy.local_dp=true"])
    task = build_task(config)
    make_client_app(task, client_mods(config), algorithms=[FedAvg])  # train and evaluate only
    with pytest.raises(ValueError, match=r"local privatization mod handles .* train\.scaffold"):
        make_client_app(task, client_mods(config), algorithms=[SCAFFOLD])


SECURE = [*TINY, "privacy.secure_aggregation=true", "privacy.local_dp=true"]


@pytest.mark.parametrize(
    ("sets", "refused"),
    [
        (["strategy.clients_per_round=1"], "strategy.clients_per_round = 1 is refused"),
        (
            ["privacy.central_dp=true", "privacy.adaptive_clipping=true"],
            "privacy.adaptive_clipping = true is refused",
        ),
    ],
)
def test_secure_aggregation_refuses_what_it_cannot_give(sets: list[str], refused: str) -> None:
    with pytest.raises(ConfigError, match=refused) as refusal:
        load_config(DEMO_CONFIG, [*SECURE, *sets])
    assert "\n" not in str(refusal.value)


def test_flwr_runs_app_masks_what_the_engines_app_masks_and_never_answers_plain_train(
    tmp_path: Path,
) -> None:
    # fedsim's engines run secure_client_app; `flwr run` runs the module-level app,
    # which resolves the config per message. Same config, same seeded computation:
    # the unmasked sums, hence the models, agree bit for bit (the keys are fresh).
    config = load_config(DEMO_CONFIG, [*SECURE, f"output_dir={tmp_path}", "name=engine"])
    run_experiment(config)
    flwr_config = replace(config, name="flwr-app")
    flwr_app = client_app_for(lambda _: flwr_config, algorithms=[FedAvg])
    with InlineGrid(flwr_app, num_nodes=8, run_config=flatten(flwr_config)) as grid:
        run_on_grid(flwr_config, grid, engine="inline")
        train = Message(
            RecordDict({keys.ARRAYS: initial_arrays(build_task(config), 0)}),
            grid.get_node_ids()[0],
            MessageType.TRAIN,
        )
        [reply] = grid.send_and_receive([train])

    assert reply.has_error() and "a plain train message is refused" in reply.error.reason
    engine_model = torch.load(config.run_dir / "model.pt", weights_only=True)
    flwr_model = torch.load(flwr_config.run_dir / "model.pt", weights_only=True)
    assert all(torch.equal(engine_model[k], flwr_model[k]) for k in engine_model)
    rows = [json.loads(line) for line in (flwr_config.run_dir / "metrics.jsonl").open()][1:]
    assert [row["train_secagg-survivors"] for row in rows] == [4, 4]
    assert all("train_loss" not in row for row in rows)  # per-client metrics stay home
